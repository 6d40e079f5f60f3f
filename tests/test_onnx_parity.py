"""Every architecture exported with kernel.models.export_onnx gives the same logits under
onnxruntime (what the edge runs) as under torch (what the fog trains), to 1e-5."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from edge.classifier import OnnxClassifier
from kernel.config import ModelConfig
from kernel.models import ARCHS, arch_spec, build_model, export_onnx

if "fed2" not in ARCHS and importlib.util.find_spec("kernel.fed2") is not None:
    import kernel.fed2  # noqa: F401  (registers the arch)

SHAPES = [(1, 8, 8), (3, 16, 16)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_onnxruntime_matches_torch(arch, shape):
    spec = arch_spec(ModelConfig(arch=arch, hidden=24, channels=6), shape, 10)
    model = build_model(spec, seed=11).eval()
    clf = OnnxClassifier(export_onnx(model, shape))
    assert clf.in_shape_ == shape and len(clf.classes_) == 10
    rng = np.random.default_rng(5)
    for n in (1, 7):
        x = rng.random((n, *shape), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = clf.decision_function(x)
        assert got.shape == ref.shape == (n, 10)
        assert np.max(np.abs(got - ref)) <= 1e-5, f"{arch} {shape} batch {n}"
        np.testing.assert_array_equal(clf.predict(x), ref.argmax(axis=1))


def test_every_known_arch_is_covered():
    # fed2 lives in kernel/fed2.py; when it exists it must be registered and so tested above
    expected = {"mlp", "cnn", "lenet", "convfc"} | ({"fed2"} if importlib.util.find_spec("kernel.fed2") else set())
    assert expected <= set(ARCHS)
