"""Query strategies: what each picks, subsetting, determinism, the registry."""

from __future__ import annotations

import numpy as np
import pytest

from edge import strategies
from edge.classifier import OnnxClassifier
from kernel.errors import ConfigError
from kernel.models import build_model, export_onnx

SHAPE = (1, 8, 8)
ALL = ["random", "uncertainty", "margin", "entropy", "ranked-batch"]


@pytest.fixture(scope="module")
def clf() -> OnnxClassifier:
    spec = {"arch": "mlp", "in_shape": list(SHAPE), "num_classes": 10, "hidden": 32}
    model = build_model(spec, seed=2)
    with __import__("torch").no_grad():  # sharpen the random model so scores spread out
        for p in model.parameters():
            p.mul_(4.0)
    return OnnxClassifier(export_onnx(model, SHAPE))


@pytest.fixture(scope="module")
def pool() -> np.ndarray:
    return np.random.default_rng(1).random((120, *SHAPE), dtype=np.float32)


def _scores(clf, x):
    p = clf.predict_proba(x)
    s = np.sort(p, axis=1)
    return {"uncertainty": 1 - p.max(axis=1), "margin": s[:, -1] - s[:, -2],
            "entropy": -(p * np.log(p)).sum(axis=1)}


def test_registry_names_and_unknown_strategy_error():
    assert strategies.names() == ALL
    assert strategies.canonical("Ranked_Batch") == "ranked-batch"
    with pytest.raises(ConfigError) as err:
        strategies.query("max-entropy", None, np.zeros((3, *SHAPE)), 1, np.random.default_rng(0))
    assert "max-entropy" in str(err.value) and all(n in str(err.value) for n in ALL)


@pytest.mark.parametrize("name,best", [("uncertainty", "max"), ("margin", "min"), ("entropy", "max")])
def test_score_based_strategies_pick_the_extremes_best_first(clf, pool, name, best):
    idx, scores = strategies.query(name, clf, pool, 10, np.random.default_rng(0))
    ref = _scores(clf, pool)[name]
    order = np.argsort(-ref if best == "max" else ref, kind="stable")
    assert set(idx.tolist()) == set(order[:10].tolist())
    np.testing.assert_allclose(scores, ref[idx], rtol=1e-9)
    diffs = np.diff(scores)
    assert np.all(diffs <= 0) if best == "max" else np.all(diffs >= 0)


def test_random_and_ranked_batch(clf, pool):
    idx, scores = strategies.query("random", clf, pool, 15, np.random.default_rng(5))
    assert len(set(idx.tolist())) == 15 and np.all(scores == 0)
    np.testing.assert_array_equal(idx, np.random.default_rng(5).choice(120, size=15, replace=False))
    unc = _scores(clf, pool)["uncertainty"]
    for labeled in (None, pool[:5]):
        idx, scores = strategies.query("ranked-batch", clf, pool, 12, np.random.default_rng(0), labeled=labeled)
        assert len(set(idx.tolist())) == 12
        np.testing.assert_allclose(scores, unc[idx], rtol=1e-6)
    # diversity term: ranked batch does not just take the top-12 most uncertain
    top = set(np.argsort(-unc)[:12].tolist())
    assert set(idx.tolist()) != top


@pytest.mark.parametrize("name", ALL)
def test_deterministic_given_the_rng_and_bounded_by_the_pool(clf, pool, name):
    a = strategies.query(name, clf, pool, 8, np.random.default_rng([7, 1]), subset=40)
    b = strategies.query(name, clf, pool, 8, np.random.default_rng([7, 1]), subset=40)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    idx, _ = strategies.query(name, clf, pool[:6], 10, np.random.default_rng(0))
    assert sorted(idx.tolist()) == list(range(6))  # asks for more than there is: gets everything
    idx, scores = strategies.query(name, clf, pool, 0, np.random.default_rng(0))
    assert idx.shape == (0,) and scores.shape == (0,)


def test_subset_scores_only_a_random_subset(clf, pool):
    # the subset is the first draw from rng; the best-entropy picks must come from it
    subset = np.sort(np.random.default_rng(3).choice(120, size=30, replace=False))
    idx, _ = strategies.query("entropy", clf, pool, 5, np.random.default_rng(3), subset=30)
    ent = _scores(clf, pool)["entropy"]
    assert set(idx.tolist()) == set(subset[np.argsort(-ent[subset])[:5]].tolist())
    full, _ = strategies.query("entropy", clf, pool, 5, np.random.default_rng(3))
    assert set(full.tolist()) != set(idx.tolist())  # the whole pool has better candidates
    assert ent[full].mean() > ent[idx].mean()


def test_candidates_restrict_the_pool_and_index_x(clf, pool):
    cand = np.arange(1, 120, 3)
    for name in ALL:
        idx, _ = strategies.query(name, clf, pool, 7, np.random.default_rng(0), candidates=cand, subset=20)
        assert len(idx) == 7 and set(idx.tolist()) <= set(cand.tolist())
