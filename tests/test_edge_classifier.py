"""OnnxClassifier: scikit-learn protocol over onnxruntime, checked against the torch model it was
exported from, and usable by modAL's query functions as they are."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from modAL.batch import uncertainty_batch_sampling
from modAL.uncertainty import (
    classifier_entropy,
    entropy_sampling,
    margin_sampling,
    uncertainty_sampling,
)
from sklearn.base import clone, is_classifier

from edge.classifier import OnnxClassifier, softmax
from kernel.errors import ModelError
from kernel.models import build_model, export_onnx

SHAPE = (1, 8, 8)


def _spec(arch: str = "mlp") -> dict:
    return {"arch": arch, "in_shape": list(SHAPE), "num_classes": 10, "hidden": 32, "channels": 4,
            "activation": "relu"}


@pytest.fixture(scope="module")
def torch_model() -> torch.nn.Module:
    return build_model(_spec("cnn"), seed=1).eval()


@pytest.fixture(scope="module")
def clf(torch_model) -> OnnxClassifier:
    return OnnxClassifier(export_onnx(torch_model, SHAPE))


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).random((37, *SHAPE), dtype=np.float32)


def test_predict_proba_is_softmax_of_the_torch_logits(clf, torch_model, x):
    with torch.no_grad():
        expected = torch.softmax(torch_model(torch.from_numpy(x)), dim=1).numpy()
    proba = clf.predict_proba(x)
    assert proba.shape == (37, 10)
    np.testing.assert_allclose(proba, expected, atol=1e-6)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    # flat rows (what modAL's batch strategies pass) give the same answer
    np.testing.assert_array_equal(clf.predict_proba(x.reshape(37, -1)), proba)


def test_softmax_is_stable_for_extreme_logits():
    p = softmax(np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4], [80.0, 80.0, 0.0]], dtype=np.float32))
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0]], atol=1e-12)


def test_sklearn_protocol(clf, torch_model, x):
    assert is_classifier(clf)
    np.testing.assert_array_equal(clf.classes_, np.arange(10))
    assert clf.n_features_in_ == 64 and clf.in_shape_ == SHAPE
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(x)).numpy()
    pred = clf.predict(x)
    np.testing.assert_array_equal(pred, logits.argmax(axis=1))
    y = pred.copy()
    y[:10] = (y[:10] + 1) % 10  # 10 of 37 wrong
    assert clf.score(x, y) == pytest.approx(27 / 37)
    # clone and pickle rebuild the session from the bytes
    for other in (clone(clf), pickle.loads(pickle.dumps(clf))):
        np.testing.assert_array_equal(other.predict_proba(x), clf.predict_proba(x))
    assert "OnnxClassifier(in_shape=(1, 8, 8), classes=10" in repr(clf)
    assert clf.predict_proba(np.empty((0, *SHAPE), np.float32)).shape == (0, 10)


def test_fit_refuses_because_the_edge_never_trains(clf, x):
    with pytest.raises(NotImplementedError, match="never trains"):
        clf.fit(x, np.zeros(len(x), dtype=np.int64))


def test_input_of_the_wrong_size_is_refused(clf):
    with pytest.raises(ValueError, match="features"):
        clf.predict_proba(np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError, match="shape"):
        clf.predict_proba(np.zeros((2, 1, 9, 9), np.float32))
    with pytest.raises(ValueError, match="must be"):
        clf.predict_proba(np.zeros(64, np.float32))


def test_modal_strategies_run_on_it_unchanged(clf, x):
    proba = clf.predict_proba(x)
    unc = 1 - proba.max(axis=1)
    idx, scores = uncertainty_sampling(clf, x, n_instances=5)
    assert set(idx) == set(np.argsort(-unc)[:5])
    np.testing.assert_allclose(scores, unc[idx])
    idx, _ = margin_sampling(clf, x, n_instances=5)
    part = np.sort(proba, axis=1)
    assert set(idx) == set(np.argsort(part[:, -1] - part[:, -2])[:5])
    ent = classifier_entropy(clf, x)
    np.testing.assert_allclose(ent, -(proba * np.log(proba)).sum(axis=1), rtol=1e-9)
    idx, _ = entropy_sampling(clf, x, n_instances=5)
    assert set(idx) == set(np.argsort(-ent)[:5])

    class Learner:  # what ranked batch expects of a modAL learner
        on_transformed = False
        X_training = None
        predict_proba = staticmethod(clf.predict_proba)

    idx, scores = uncertainty_batch_sampling(Learner(), x.reshape(len(x), -1), n_instances=6)
    assert len(set(idx.tolist())) == 6
    np.testing.assert_allclose(scores, unc[idx])


def _export_raw(model: torch.nn.Module, dummy: torch.Tensor, input_name: str = "x") -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), (dummy,), buf, dynamo=False, input_names=[input_name],
                      output_names=["logits"], dynamic_axes={input_name: {0: "n"}, "logits": {0: "n"}},
                      opset_version=17)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["garbage", "truncated", "empty", "flat-input", "input-name", "not-bytes"])
def test_corrupt_or_wrong_shaped_onnx_raises_model_error(clf, case):
    good = bytes(clf.onnx)
    payload: object = {
        "garbage": b"\x08\x07not an onnx model at all" * 10,
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "not-bytes": "model.onnx",
    }.get(case)
    if case == "flat-input":  # (n, 64) input: not (n, C, H, W)
        payload = _export_raw(torch.nn.Sequential(torch.nn.Linear(64, 10)), torch.zeros(1, 64))
    elif case == "input-name":
        payload = _export_raw(build_model(_spec("mlp"), seed=0), torch.zeros(1, *SHAPE), input_name="images")
    with pytest.raises(ModelError) as err:
        OnnxClassifier(payload)  # type: ignore[arg-type]
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300
    assert "ONNX" in msg


def test_exported_weights_are_constants_onnxruntime_can_prepack(clf):
    # Weights listed as graph inputs (overridable) would let an edge swap them into the session it
    # has, but onnxruntime cannot pre-pack them then: a 28x28 CNN ran 2.3-2.7x slower (measured,
    # docs/benchmarks.md, session 7). The export keeps them constant.
    assert clf._session.get_overridable_initializers() == []
