"""Partitioning a pool over edges (kernel/partition.py): iid, Dirichlet(alpha), fixed class split."""

from __future__ import annotations

import numpy as np
import pytest

from kernel.errors import ConfigError
from kernel.partition import partition_indices

SPLIT = [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]]  # the 2/2/3/3 split


@pytest.fixture(scope="module")
def labels() -> tuple[np.ndarray, np.ndarray]:
    """10 classes x 200 samples, shuffled; the pool leaves out a few indices to check that only
    pool members are handed out."""
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(10), 200))
    pool = np.setdiff1d(np.arange(len(y)), rng.choice(len(y), 100, replace=False))
    return y, pool


def _check_disjoint_cover(parts: list[np.ndarray], pool: np.ndarray) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)), "parts overlap"
    np.testing.assert_array_equal(np.sort(allidx), np.sort(pool))


def _max_class_share(y: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "classes"])
def test_deterministic_by_seed(labels, scheme):
    y, pool = labels
    kw = dict(alpha=0.5, class_split=SPLIT)
    a = partition_indices(y, pool, 8, scheme, seed=3, **kw)
    b = partition_indices(y, pool, 8, scheme, seed=3, **kw)
    c = partition_indices(y, pool, 8, scheme, seed=4, **kw)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    assert all(p.dtype.kind == "i" for p in a)


@pytest.mark.parametrize("n_parts", [1, 3, 7, 64])
def test_iid_balanced(labels, n_parts):
    y, pool = labels
    parts = partition_indices(y, pool, n_parts, "iid", seed=0)
    assert len(parts) == n_parts
    _check_disjoint_cover(parts, pool)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    if n_parts <= 7:  # enough samples per part for the class mix to look like the pool's
        assert _max_class_share(y, parts) < 0.2


def test_dirichlet_small_alpha_is_skewed_and_covers(labels):
    y, pool = labels
    iid = _max_class_share(y, partition_indices(y, pool, 10, "iid", seed=0))
    skewed = [partition_indices(y, pool, 10, "dirichlet", alpha=0.1, seed=s) for s in range(3)]
    for parts in skewed:
        _check_disjoint_cover(parts, pool)
        assert all(len(p) > 0 for p in parts)
    share = np.mean([_max_class_share(y, p) for p in skewed])
    flat = np.mean([_max_class_share(y, partition_indices(y, pool, 10, "dirichlet", alpha=100.0, seed=s))
                    for s in range(3)])
    # measured (seeds 0-2): iid 0.13, alpha=100 0.11, alpha=0.1 0.59
    assert iid < 0.2 and flat < 0.2
    assert share > 0.4 and share > 2.5 * flat


@pytest.mark.parametrize("n_parts", [6, 20, 100])
def test_dirichlet_every_edge_non_empty(labels, n_parts):
    y, pool = labels
    for seed in range(3):
        parts = partition_indices(y, pool, n_parts, "dirichlet", alpha=0.05, seed=seed)
        assert len(parts) == n_parts
        _check_disjoint_cover(parts, pool)
        assert min(len(p) for p in parts) >= 1


def test_class_split_one_group_per_edge(labels):
    y, pool = labels
    parts = partition_indices(y, pool, 4, "classes", class_split=SPLIT, seed=0)
    _check_disjoint_cover(parts, pool)
    for k, p in enumerate(parts):
        assert set(np.unique(y[p]).tolist()) == set(SPLIT[k])
        np.testing.assert_array_equal(np.sort(p), np.sort(pool[np.isin(y[pool], SPLIT[k])]))


def test_class_split_more_edges_than_groups_share_groups(labels):
    y, pool = labels
    parts = partition_indices(y, pool, 10, "classes", class_split=SPLIT, seed=0)
    _check_disjoint_cover(parts, pool)
    for k, p in enumerate(parts):
        g = k % len(SPLIT)
        assert set(np.unique(y[p]).tolist()) <= set(SPLIT[g]) and len(p) > 0
    for g, classes in enumerate(SPLIT):
        members = [parts[k] for k in range(10) if k % len(SPLIT) == g]
        assert len(members) in (2, 3)
        joined = np.concatenate(members)
        np.testing.assert_array_equal(np.sort(joined), np.sort(pool[np.isin(y[pool], classes)]))
        sizes = [len(m) for m in members]
        assert max(sizes) - min(sizes) <= 1  # a group is shared evenly


def test_class_split_fewer_edges_than_groups(labels):
    """Edge i gets group i mod len(split): with 2 edges only the first two groups are used."""
    y, pool = labels
    parts = partition_indices(y, pool, 2, "classes", class_split=SPLIT, seed=0)
    assert set(np.unique(y[parts[0]]).tolist()) == {0, 1}
    assert set(np.unique(y[parts[1]]).tolist()) == {2, 3}


@pytest.mark.parametrize(
    "n_parts, scheme, kw, needle",
    [
        (0, "iid", {}, "at least one edge"),
        (3, "zipf", {}, "unknown partition scheme"),
        (3, "classes", {"class_split": []}, "class_split"),
        (3, "classes", {"class_split": [[0, 1], [1, 2]]}, "class 1 in more than one group"),
    ],
)
def test_bad_arguments(labels, n_parts, scheme, kw, needle):
    y, pool = labels
    with pytest.raises(ConfigError) as e:
        partition_indices(y, pool, n_parts, scheme, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_partition_level_fog_puts_class_groups_on_fogs():
    """With partition_level=fog the 2/2/3/3 split is between fogs (the FL participants): every
    edge of fog f holds only group f's classes, even with many edges per fog."""
    from kernel.config import build_config
    from kernel.data import load_dataset, make_splits

    cfg = build_config([], [("topology.fogs", 4), ("topology.edges_per_fog", 5), ("data.partition", "classes"),
                            ("data.partition_level", "fog")], use_env=False)
    ds = load_dataset(cfg.data)
    sp = make_splits(cfg, ds)
    groups = cfg.data.class_split
    all_idx = np.concatenate(sp.edges)
    assert len(all_idx) == len(np.unique(all_idx)) == len(sp.pool)
    for f in range(4):
        for j in range(5):
            part = sp.edges[f * 5 + j]
            assert len(part) > 0
            assert set(np.unique(ds.y[part]).tolist()) <= set(groups[f])
    edge_level = make_splits(cfg.model_copy(update={"data": cfg.data.model_copy(update={"partition_level": "edge"})}), ds)
    fog0 = np.concatenate(edge_level.edges[:5])
    assert len(set(np.unique(ds.y[fog0]).tolist())) == 10  # at edge level fog-0 sees every class
