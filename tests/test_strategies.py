"""Aggregation strategies: streaming FedAvg numerics and memory, kinds, masked sums, selection,
robust aggregators' numerics, and robustness under attack in a real simulated federation."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch

from cloud.strategies import (
    AggregationError,
    FedAvg,
    FedProx,
    Krum,
    Median,
    TrimmedMean,
    make_strategy,
)
from kernel.config import CloudConfig
from kernel.errors import ConfigError, FogflError
from protos.control import TrainConfig


def _model(rng, shapes=None):
    shapes = shapes or {"w1": (7, 5), "b1": (7,), "w2": (3, 7), "b2": (3,)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _ups(rng, g, n, scale=0.01):
    return [{k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in g.items()} for _ in range(n)]


def _run(strategy, g, ups, ns, kind="delta", lr=1.0, metas=None, spec=None):
    strategy.begin_round(g, spec or {"arch": "mlp"})
    for i, (u, n) in enumerate(zip(ups, ns, strict=True)):
        strategy.add_update(f"fog-{i}", u, n, kind, (metas or [{}] * len(ups))[i])
    assert strategy.received == len(ups)
    return strategy.end_round(lr)


# ----------------------------------------------------------------------------- FedAvg numerics
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_streaming_fedavg_equals_naive_weighted_mean(precision):
    rng = np.random.default_rng(0)
    g = _model(rng)
    ups = _ups(rng, g, 37, scale=0.5)
    ns = [int(v) for v in rng.integers(1, 500, len(ups))]
    out = _run(FedAvg(precision), g, ups, ns)
    total = sum(ns)
    for k in g:
        naive = g[k].astype(np.float64) + sum(u[k].astype(np.float64) * n for u, n in zip(ups, ns, strict=True)) / total
        assert out[k].dtype == np.float32 and out[k].shape == g[k].shape
        np.testing.assert_allclose(out[k], naive, rtol=0, atol=1e-6)


def test_gradient_kind_steps_against_the_mean_and_delta_adds_it():
    rng = np.random.default_rng(1)
    g = _model(rng)
    ups = _ups(rng, g, 4, scale=1.0)
    ns = [10, 20, 30, 40]
    mean = {k: sum(u[k].astype(np.float64) * n for u, n in zip(ups, ns, strict=True)) / 100 for k in g}
    grad = _run(FedAvg(), g, ups, ns, kind="gradient", lr=0.3)
    delta = _run(FedAvg(), g, ups, ns, kind="delta", lr=0.3)  # server_lr does not scale deltas
    for k in g:
        np.testing.assert_allclose(grad[k], g[k] - 0.3 * mean[k], atol=1e-6)
        np.testing.assert_allclose(delta[k], g[k] + mean[k], atol=1e-6)
    # the same, through the robust aggregators' path (median of 4 equal updates = the update)
    same = [ups[0]] * 5
    med = _run(Median(), g, same, [1] * 5, kind="gradient", lr=0.5)
    for k in g:
        np.testing.assert_allclose(med[k], g[k] - 0.5 * ups[0][k], atol=1e-6)


def test_masked_updates_are_summed_and_divided_by_total_samples():
    """Secure aggregation: each fog sends n_i * u_i + sum_j m_ij with m_ij = -m_ji, masks 1000x
    larger than the signal. The plain sum cancels them; the result is the weighted mean."""
    rng = np.random.default_rng(2)
    g = _model(rng)
    n_fogs = 8
    ups = _ups(rng, g, n_fogs, scale=0.01)
    ns = [int(v) for v in rng.integers(5, 50, n_fogs)]
    masks = {(i, j): {k: (10.0 * rng.standard_normal(v.shape)) for k, v in g.items()}
             for i in range(n_fogs) for j in range(i + 1, n_fogs)}
    sent = []
    for i in range(n_fogs):
        m = {k: ups[i][k].astype(np.float64) * ns[i] for k in g}
        for j in range(n_fogs):
            if i == j:
                continue
            sign = 1.0 if i < j else -1.0
            for k in g:
                m[k] += sign * masks[(min(i, j), max(i, j))][k]
        sent.append({k: v.astype(np.float32) for k, v in m.items()})
    out = _run(FedAvg(), g, sent, ns, metas=[{"masked": True}] * n_fogs)
    unmasked = _run(FedAvg(), g, ups, ns)
    for k in g:
        # float32 rounding of the masked values at the fogs (|mask| ~ 30) bounds the agreement
        np.testing.assert_allclose(out[k], unmasked[k], atol=2e-5)
        assert np.abs(sent[0][k]).max() > 20 * np.abs(ups[0][k] * ns[0]).max()  # masks dominate


def test_fedavg_extra_memory_is_about_one_model_whatever_the_number_of_fogs():
    rng = np.random.default_rng(3)
    g = _model(rng, {"w": (512, 512), "b": (512,)})
    model_bytes = sum(v.nbytes for v in g.values())
    ups = _ups(rng, g, 12)
    s = FedAvg()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        s.begin_round(g, {})
        for i, u in enumerate(ups):
            s.add_update(f"fog-{i}", u, 10 + i, "delta", {})
        out = s.end_round(1.0)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= 1.2 * model_bytes, f"peak {peak / model_bytes:.2f} models"
    assert set(out) == set(g)


# ----------------------------------------------------------------------------- errors
def test_mixing_kinds_masks_duplicates_and_wrong_tensors_are_rejected():
    rng = np.random.default_rng(4)
    g = _model(rng)
    u = _ups(rng, g, 1)[0]
    s = FedAvg()
    s.begin_round(g, {})
    s.add_update("fog-0", u, 3, "delta", {})
    with pytest.raises(ValueError, match="gradient"):
        s.add_update("fog-1", u, 3, "gradient", {})
    with pytest.raises(AggregationError, match="masked"):
        s.add_update("fog-1", u, 3, "delta", {"masked": True})
    with pytest.raises(AggregationError, match="already"):
        s.add_update("fog-0", u, 3, "delta", {})
    with pytest.raises(AggregationError, match="names"):
        s.add_update("fog-2", {k: v for k, v in u.items() if k != "b2"}, 3, "delta", {})
    with pytest.raises(AggregationError, match="shape"):
        s.add_update("fog-2", {**u, "b2": np.zeros(4, np.float32)}, 3, "delta", {})
    with pytest.raises(AggregationError, match="samples"):
        s.add_update("fog-2", u, 0, "delta", {})
    with pytest.raises(AggregationError, match="kind"):
        s.add_update("fog-2", u, 1, "weights", {})
    assert s.received == 1  # the rejected updates left no trace
    out = s.end_round(1.0)
    for k in g:
        np.testing.assert_allclose(out[k], g[k] + u[k], atol=1e-7)
    assert issubclass(AggregationError, FogflError)
    with pytest.raises(AggregationError, match="masked"):
        _run(Median(), g, [u] * 3, [1] * 3, metas=[{"masked": True}] * 3)


def test_no_update_keeps_the_global_model():
    rng = np.random.default_rng(5)
    g = _model(rng)
    s = FedAvg()
    s.begin_round(g, {})
    out = s.end_round(1.0)
    for k in g:
        np.testing.assert_array_equal(out[k], g[k])
        assert out[k] is not g[k]


# ----------------------------------------------------------------------------- selection, config
def test_select_is_seeded_sorted_and_takes_ceil_fraction():
    ids = [f"fog-{i}" for i in range(10)]
    s = FedAvg()
    a = s.select(ids, 0.3, np.random.default_rng(7))
    b = s.select(list(reversed(ids)), 0.3, np.random.default_rng(7))
    assert a == b == sorted(a) and len(a) == 3  # 0.3*10 is 3.0000000000000004 in floats
    draws = {tuple(s.select(ids, 0.3, np.random.default_rng(seed))) for seed in range(20)}
    assert len(draws) > 5
    assert len(s.select(ids, 0.01, np.random.default_rng(0))) == 1
    assert len(s.select(ids, 0.25, np.random.default_rng(0))) == math.ceil(2.5)
    assert s.select(ids, 1.0, np.random.default_rng(0)) == sorted(ids)
    assert set(s.select(ids, 0.5, np.random.default_rng(0))) <= set(ids)
    with pytest.raises(ConfigError):
        s.select(ids, 0.0, np.random.default_rng(0))


def test_configure_fedprox_sets_mu_and_make_strategy_maps_names():
    train = TrainConfig(lr=0.1)
    assert FedAvg().configure(1, train).prox_mu == 0.0
    prox = make_strategy(CloudConfig(strategy="fedprox"), train)
    assert isinstance(prox, FedProx) and prox.configure(1, train).prox_mu == 0.01
    prox = make_strategy(CloudConfig(strategy="fedprox"), TrainConfig(prox_mu=0.3))
    assert prox.configure(2, train).prox_mu == 0.3
    assert train.prox_mu == 0.0  # the caller's config is not modified
    for name in ("fedavg", "fedprox", "fed2", "median", "trimmed_mean", "krum"):
        assert make_strategy(CloudConfig(strategy=name), train).name == name
    k = make_strategy(CloudConfig(strategy="krum", krum_faulty=3), train)
    assert k.faulty == 3
    assert make_strategy(CloudConfig(strategy="trimmed_mean", trim_ratio=0.1), train).trim_ratio == 0.1


# ----------------------------------------------------------------------------- robust numerics
def _scalar_ups(values):
    return [{"w": np.array([v, -v, 2 * v], dtype=np.float32)} for v in values]


def test_median_and_trimmed_mean_on_small_arrays():
    g = {"w": np.zeros(3, np.float32)}
    vals = [1.0, 2.0, 3.0, 4.0, 1000.0]
    med = _run(Median(), g, _scalar_ups(vals), [1] * 5)
    np.testing.assert_allclose(med["w"], [3.0, -3.0, 6.0])
    tm = _run(TrimmedMean(0.2), g, _scalar_ups(vals), [1] * 5)  # drops 1 and 1000
    np.testing.assert_allclose(tm["w"], [3.0, -3.0, 6.0])
    tm0 = _run(TrimmedMean(0.0), g, _scalar_ups(vals), [1] * 5)  # plain mean
    np.testing.assert_allclose(tm0["w"], [202.0, -202.0, 404.0], rtol=1e-6)
    even = _run(Median(), g, _scalar_ups([1.0, 2.0, 10.0, 11.0]), [5] * 4)  # unweighted, mean of middle two
    np.testing.assert_allclose(even["w"], [6.0, -6.0, 12.0])
    tm4 = _run(TrimmedMean(0.3), g, _scalar_ups([1.0, 2.0, 10.0, 11.0, -50.0, 70.0]), [1] * 6)
    np.testing.assert_allclose(tm4["w"], [(1 + 2 + 10 + 11) / 4, -(1 + 2 + 10 + 11) / 4, (1 + 2 + 10 + 11) / 2])


def test_krum_picks_the_central_update_and_falls_back_to_median():
    g = {"w": np.zeros(2, np.float32)}
    pts = [(0.0, 0.0), (0.1, 0.0), (0.0, 0.1), (0.1, 0.1), (0.05, 0.05), (9.0, 9.0), (-8.0, 7.0)]
    ups = [{"w": np.array(p, np.float32)} for p in pts]
    k = Krum(faulty=2)
    out = _run(k, g, ups, [1] * len(ups))
    np.testing.assert_allclose(out["w"], [0.05, 0.05])
    assert k.last_choice == ["fog-4"]
    # scores by hand for fog-0: distances to its n-f-2 = 3 nearest: 0.01, 0.01, 0.005
    s = k.scores([u for u in ups])
    assert s[0] == pytest.approx(0.025, rel=1e-5)
    mk = Krum(faulty=2, multi=5)
    out = _run(mk, g, ups, [1] * len(ups))
    np.testing.assert_allclose(out["w"], [0.05, 0.05], atol=1e-7)
    assert sorted(mk.last_choice) == [f"fog-{i}" for i in range(5)]
    # n = 6 <= 2f + 2 with f = 2: coordinate-wise median
    few = _run(Krum(faulty=2), g, ups[:4] + ups[5:], [1] * 6)
    np.testing.assert_allclose(few["w"], np.median(np.array(pts[:4] + pts[5:]), axis=0), atol=1e-7)
    # arrival order does not matter
    k2 = Krum(faulty=2)
    k2.begin_round(g, {})
    for i in reversed(range(len(ups))):
        k2.add_update(f"fog-{i}", ups[i], 1, "delta", {})
    np.testing.assert_allclose(k2.end_round(1.0)["w"], [0.05, 0.05])


# ----------------------------------------------------------------------------- under attack
@pytest.fixture(scope="module")
def digits_federation():
    from deploy.experiments_fed2 import federation_data

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, and the same numbers as `python -m deploy.experiments_fed2 --attack`
    ds, parts, test, _ = federation_data("digits", 10, "iid", seed=0)
    spec = {"arch": "mlp", "in_shape": list(ds.shape), "num_classes": 10, "hidden": 32, "activation": "relu"}
    train = TrainConfig(local_epochs=2, lr=0.05, batch_size=32, momentum=0.9)
    yield ds, parts, test, spec, train
    torch.set_num_threads(threads)


ATTACKERS = (3, 7)
ROUNDS = 20


def _final(fed, strategy, attack=None):
    from deploy.experiments_fed2 import simulate

    ds, parts, test, spec, train = fed
    res = simulate(spec, ds, parts, test, strategy, train, ROUNDS, seed=0, attackers=ATTACKERS, attack=attack)
    return float(np.mean(res.accuracy[-3:]))  # the test set has 359 images: smooth over 3 rounds


@pytest.fixture(scope="module")
def clean_fedavg(digits_federation):
    return _final(digits_federation, FedAvg())


@pytest.fixture(scope="module")
def clean_krum(digits_federation):
    return _final(digits_federation, Krum(faulty=2))


@pytest.mark.parametrize("factor", [-10.0, 50.0, -1.0], ids=["x-10", "x50", "sign-flip"])
def test_robust_aggregators_survive_scaled_and_flipped_updates(digits_federation, clean_fedavg, clean_krum, factor):
    """10 fogs on IID digits, 2 of them attackers. Median stays within 2 points of clean FedAvg;
    plain Krum (one fog's update per round, which costs accuracy even without attack) within 5,
    Multi-Krum and the trimmed mean within 2; FedAvg under a scaling attack collapses."""
    from deploy.experiments_fed2 import scale_attack

    att = scale_attack(factor)
    assert clean_fedavg > 0.9
    med = _final(digits_federation, Median(), att)
    assert med >= clean_fedavg - 0.02, (med, clean_fedavg)
    krum = _final(digits_federation, Krum(faulty=2), att)
    assert krum >= clean_fedavg - 0.05, (krum, clean_fedavg)
    assert krum >= clean_krum - 0.02, (krum, clean_krum)  # the attack costs Krum nothing
    if factor == -10.0:
        mkrum = _final(digits_federation, Krum(faulty=2, multi=8), att)
        assert mkrum >= clean_fedavg - 0.02, (mkrum, clean_fedavg)
        tm = _final(digits_federation, TrimmedMean(0.2), att)
        assert tm >= clean_fedavg - 0.02, (tm, clean_fedavg)
    if factor != -1.0:
        attacked = _final(digits_federation, FedAvg(), att)
        assert attacked < clean_fedavg - 0.3, (attacked, clean_fedavg)


def test_the_fold_runs_blas_on_one_thread_and_restores_the_count():
    from threadpoolctl import ThreadpoolController

    from protos.blas import one_blas_thread as _one_blas_thread

    blas = ThreadpoolController().select(user_api="blas")
    if not blas.lib_controllers:
        pytest.skip("no BLAS library that threadpoolctl can control")
    with blas.limit(limits=2):
        before = [lib.get_num_threads() for lib in blas.lib_controllers]
        if max(before) < 2:
            pytest.skip("the BLAS libraries run one thread on this machine whatever they are told")
        with _one_blas_thread():
            assert {lib.get_num_threads() for lib in blas.lib_controllers} == {1}
        assert [lib.get_num_threads() for lib in blas.lib_controllers] == before
        with blas.limit(limits=1), _one_blas_thread():  # already at one: left alone
            assert {lib.get_num_threads() for lib in blas.lib_controllers} == {1}


def test_fedavg_folds_unaligned_views_as_it_folds_aligned_arrays():
    """Updates decoded in place from a received payload may be unaligned views (BLAS wrappers
    would copy them whole); they go through the scratch path and give the same aggregate."""
    rng = np.random.default_rng(3)
    g = {"w": rng.standard_normal((64, 33)).astype(np.float32), "b": rng.standard_normal(33).astype(np.float32)}
    ups = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()} for _ in range(3)]

    def unaligned(a: np.ndarray) -> np.ndarray:
        raw = b"\0" + a.tobytes()
        view = np.frombuffer(raw, dtype=np.float32, count=a.size, offset=1).reshape(a.shape)
        assert not view.flags.aligned
        return view

    out = {}
    for mode in ("aligned", "unaligned"):
        s = FedAvg()
        s.begin_round(g, {"arch": "mlp"})
        for i, u in enumerate(ups):
            s.add_update(f"fog-{i}", {k: unaligned(v) if mode == "unaligned" else v for k, v in u.items()},
                         10 * (i + 1), "delta", {})
        out[mode] = s.end_round(1.0)
    for k in g:
        np.testing.assert_array_equal(out["aligned"][k], out["unaligned"][k])
        ref = g[k] + sum(u[k].astype(np.float64) * 10 * (i + 1) for i, u in enumerate(ups)) / 60
        np.testing.assert_allclose(out["aligned"][k], ref, rtol=1e-5, atol=1e-6)
