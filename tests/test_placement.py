"""Where ``fogfl run`` puts the node processes: each fog with its edges on an equal share of the CPUs."""

from __future__ import annotations

import pytest

from deploy.launcher import NetworkRun, place_fog_groups
from kernel.config import build_config


def _cfg(fogs: int, edges: int, fraction: float = 1.0):
    return build_config([], [("topology.fogs", fogs), ("topology.edges_per_fog", edges),
                             ("topology.fraction", fraction)], use_env=False)


def _fogs(placement: dict) -> dict[str, list[int]]:
    return {name: sorted(cpus) for name, cpus in placement.items() if ".edge-" not in name}


def test_each_fog_and_its_edges_share_one_block_of_cpus():
    cfg = _cfg(2, 3)
    placed, why = place_fog_groups(cfg, frozenset({0, 1, 2, 3}))
    assert _fogs(placed) == {"fog-0": [0, 1], "fog-1": [2, 3]}
    for fog in cfg.fog_ids():
        assert all(placed[e] == placed[fog] for e in cfg.edge_ids(fog))
    assert set(placed) == {*cfg.fog_ids(), *(e for f in cfg.fog_ids() for e in cfg.edge_ids(f))}
    assert "2 of 4 CPUs" in why


def test_the_cpus_are_the_ones_given_not_the_first_n():
    placed, _ = place_fog_groups(_cfg(2, 1), frozenset({3, 5, 9, 12}))
    assert _fogs(placed) == {"fog-0": [3, 5], "fog-1": [9, 12]}


def test_more_fogs_than_cpus_go_round_robin_when_they_divide_evenly():
    placed, why = place_fog_groups(_cfg(6, 2), frozenset({0, 1}))
    assert _fogs(placed) == {f"fog-{i}": [i % 2] for i in range(6)}
    assert "3 fog groups per CPU" in why


@pytest.mark.parametrize(("fogs", "cpus", "reason"), [
    (2, {0}, "1 CPU usable"),
    (3, {0, 1}, "do not share 2 CPUs equally"),
    (4, {0, 1, 2, 3, 4, 5}, "do not share 6 CPUs equally"),
    (1, {0, 1}, "one fog group"),
])
def test_nothing_is_pinned_when_the_shares_cannot_be_equal_or_useful(fogs, cpus, reason):
    placed, why = place_fog_groups(_cfg(fogs, 2), frozenset(cpus))
    assert placed == {} and reason in why


def test_partial_participation_is_not_pinned():
    placed, why = place_fog_groups(_cfg(2, 2, fraction=0.5), frozenset({0, 1}))
    assert placed == {} and "fraction" in why


def test_a_run_can_leave_placement_to_the_os(tmp_path):
    run = NetworkRun(_cfg(2, 2), tmp_path, attack=False, placement="none")
    assert run.cpus == {} and "none" in run.placement
    with pytest.raises(ValueError, match="placement"):
        NetworkRun(_cfg(2, 2), tmp_path, attack=False, placement="everywhere")
