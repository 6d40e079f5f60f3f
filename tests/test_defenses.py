"""fog.defenses: clipping, noise, pruning, secure-aggregation masks; and that a masked upload no
longer leaks while the masked aggregate is the plain weighted mean."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from deploy.bench.bench_attacks import SPEC, digit_batch, masked_round
from fog.defenses import DefenseError, apply_defenses, global_norm, pair_seed, unmask_sum
from kernel.config import DefenseConfig


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"0.weight": rng.standard_normal((12, 1, 5, 5)).astype(np.float32),
            "0.bias": rng.standard_normal(12).astype(np.float32),
            "1.weight": (0.01 * rng.standard_normal((10, 48))).astype(np.float32),
            "1.bias": np.zeros(10, np.float32)}


def _apply(update, cfg, *, seed=0, fog="fog-0", peers=("fog-0",), n=10, round_=1):
    return apply_defenses(update, cfg, rng=np.random.default_rng(seed), fog_id=fog, round_=round_,
                          peers=list(peers), num_samples=n)


def test_clip_bounds_global_norm_and_leaves_small_updates_alone():
    u = _update()
    assert global_norm(u) > 1.0
    out = _apply(u, DefenseConfig(clip=1.0))
    assert global_norm(out) == pytest.approx(1.0, rel=1e-5)
    # direction kept
    ratio = out["0.weight"] / u["0.weight"]
    assert np.allclose(ratio, ratio.flat[0], rtol=1e-4)
    big = _apply(u, DefenseConfig(clip=1e6))
    for k in u:
        np.testing.assert_array_equal(big[k], u[k])


def test_prune_ratio_holds_globally_and_keeps_the_largest():
    u = _update(1)
    total = sum(v.size for v in u.values())
    for ratio in (0.5, 0.9, 0.99):
        out = _apply(u, DefenseConfig(prune_ratio=ratio))
        zeros = sum(int((v == 0).sum()) for v in out.values())
        assert zeros == int(np.floor(ratio * total))  # u's zero bias entries are among the pruned
        kept = np.concatenate([np.abs(v[v != 0]) for v in out.values()])
        dropped = np.concatenate([np.abs(u[k][out[k] == 0]) for k in u])
        assert kept.min() >= dropped.max()
        for k in u:  # surviving entries unchanged
            np.testing.assert_array_equal(out[k][out[k] != 0], u[k][out[k] != 0])


def test_noise_std_relative_to_clip_absolute_without_and_deterministic():
    u = {"w": np.zeros((200, 200), np.float32)}
    rel = _apply(u, DefenseConfig(clip=2.0, noise_sigma=0.5))
    assert np.std(rel["w"]) == pytest.approx(1.0, rel=0.02)
    ab = _apply(u, DefenseConfig(noise_sigma=0.5))
    assert np.std(ab["w"]) == pytest.approx(0.5, rel=0.02)
    again = _apply(u, DefenseConfig(noise_sigma=0.5))
    np.testing.assert_array_equal(ab["w"], again["w"])
    other = _apply(u, DefenseConfig(noise_sigma=0.5), seed=1)
    assert not np.array_equal(ab["w"], other["w"])


def test_order_prune_then_clip_and_input_untouched_dtype_kept():
    u = _update(2)
    before = {k: v.copy() for k, v in u.items()}
    out = _apply(u, DefenseConfig(prune_ratio=0.9, clip=0.5))
    total = sum(v.size for v in u.values())
    assert sum(int((v == 0).sum()) for v in out.values()) >= int(0.9 * total)
    assert global_norm(out) <= 0.5 * (1 + 1e-5)
    for k in u:
        np.testing.assert_array_equal(u[k], before[k])
        assert out[k].dtype == np.float32


def test_masks_cancel_in_the_weighted_aggregate():
    fogs = [f"fog-{i}" for i in range(5)]
    ns = [3, 10, 1, 250, 40]
    ups = [_update(10 + i) for i in range(5)]
    cfg = DefenseConfig(masking=True, mask_scale=10.0)
    masked = [_apply(u, cfg, fog=f, peers=fogs[::-1], n=n, round_=7) for u, f, n in zip(ups, fogs, ns, strict=True)]
    # one masked upload is far from the fog's scaled update (the mask dominates)
    assert np.abs(masked[0]["0.weight"] - ns[0] * ups[0]["0.weight"]).mean() > 5.0
    agg = unmask_sum(masked, ns)
    ref = {k: sum(u[k].astype(np.float64) * n for u, n in zip(ups, ns, strict=True)) / sum(ns) for k in agg}
    for k in agg:
        assert np.max(np.abs(agg[k] - ref[k])) <= 1e-5
    # a missing fog leaves masks in: the aggregate is wrong (no dropout recovery)
    partial = unmask_sum(masked[:-1], ns[:-1])
    ref_p = {k: sum(u[k].astype(np.float64) * n for u, n in zip(ups[:-1], ns[:-1], strict=True)) / sum(ns[:-1])
             for k in agg}
    assert max(np.max(np.abs(partial[k] - ref_p[k])) for k in agg) > 1e-2


def test_pair_seeds_are_symmetric_and_separate_rounds_and_pairs():
    assert pair_seed(b"s", 1, "fog-0", "fog-1", "w") == pair_seed(b"s", 1, "fog-1", "fog-0", "w")
    seeds = {pair_seed(b"s", r, a, b, "w") for r in (1, 2) for a, b in (("fog-0", "fog-1"), ("fog-0", "fog-2"))}
    assert len(seeds) == 4
    assert pair_seed(b"s", 1, "fog-0", "fog-1", "w") != pair_seed(b"t", 1, "fog-0", "fog-1", "w")


def test_masking_needs_the_fog_among_the_peers():
    with pytest.raises(DefenseError, match="not among"):
        _apply(_update(), DefenseConfig(masking=True), fog="fog-9", peers=("fog-0", "fog-1"))


def test_defenses_module_is_numpy_only():
    code = "import sys, fog.defenses; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_masked_single_upload_does_not_reconstruct_but_the_aggregate_is_exact():
    import attacks.gradient_matching  # noqa: F401
    from attacks.base import REGISTRY
    from attacks.scoring import score
    from deploy.cases import make_capture
    from protos.control import TrainConfig

    batches = [digit_batch(300 + i, 1) for i in range(3)]
    caps, plain, ns = masked_round(SPEC, batches, seed=0)
    agg = unmask_sum([c.update for c in caps], ns)
    ref = {k: sum(p[k].astype(np.float64) * n for p, n in zip(plain, ns, strict=True)) / sum(ns) for k in agg}
    assert max(float(np.max(np.abs(agg[k] - ref[k]))) for k in agg) <= 1e-5

    x, y = batches[0]
    best = 0.0
    for name, opts in (("idlg", {"iterations": 30}), ("ig", {"iterations": 200, "restarts": 1})):
        rec = REGISTRY[name](seed=0, **opts).reconstruct(caps[0])
        best = max(best, score(rec.x, rec.y, x, y)["psnr_max"])
    assert best <= 12.0
    # the same fog's unmasked upload does leak under the same attack (the test can fail)
    plain_cap = make_capture(SPEC, x, y, TrainConfig(update_kind="gradient"), seed=0)
    rec = REGISTRY["idlg"](seed=0, iterations=30).reconstruct(plain_cap)
    assert score(rec.x, rec.y, x, y)["psnr_max"] >= 30.0
