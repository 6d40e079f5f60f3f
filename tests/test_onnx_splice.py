"""The splicing ONNX exporter: the same bytes as a torch export for every architecture, a torch
export every time for an architecture whose weights are not stored verbatim, one-line errors
for parameters that do not fit."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kernel.config import ModelConfig
from kernel.errors import ModelError
from kernel.models import ARCHS, arch_spec, build_model, export_onnx, get_params, register_arch, set_params
from kernel.onnx_splice import OnnxExporter, exporter_for, float_initializers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch", ["mlp", "cnn", "lenet", "convfc", "fed2"])
def test_splice_is_byte_identical_to_a_torch_export(arch):
    spec = arch_spec(ModelConfig(arch=arch, hidden=16, channels=4), (1, 8, 8), 10)
    ex = OnnxExporter(spec)
    assert ex.spliced
    for seed in (1, 2):
        model = build_model(spec, seed=seed)
        params = get_params(model)
        assert ex(params) == export_onnx(model, spec["in_shape"])
    # and it is a usable model: same logits as torch on some input
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(ex(params), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(["logits"], {"x": x})[0], want, rtol=1e-4, atol=1e-5)


def test_every_parameter_is_found_where_its_bytes_are():
    spec = arch_spec(ModelConfig(arch="mlp", hidden=16), (1, 8, 8), 10)
    model = build_model(spec, seed=0)
    onnx = export_onnx(model, spec["in_shape"])
    spans = float_initializers(onnx)
    for name, arr in get_params(model).items():
        start, end = spans[name]
        assert onnx[start:end] == arr.astype("<f4").tobytes()


@pytest.fixture
def nobias_arch():
    """A model torch exports with a transposed (renamed, constant-folded) weight: not spliceable."""

    @register_arch("test-nobias")
    def _nobias(spec: dict) -> nn.Module:
        c, h, w = spec["in_shape"]
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16, bias=False), nn.ReLU(),
                             nn.Linear(16, spec["num_classes"]))

    yield {"arch": "test-nobias", "in_shape": [1, 8, 8], "num_classes": 10}
    ARCHS.pop("test-nobias")


def test_an_unspliceable_architecture_is_exported_by_torch_every_time(nobias_arch):
    ex = OnnxExporter(nobias_arch)
    assert not ex.spliced
    model = build_model(nobias_arch, seed=4)
    assert ex(get_params(model)) == export_onnx(model, nobias_arch["in_shape"])
    other = {k: np.full_like(v, 0.5) for k, v in get_params(model).items()}
    set_params(model, other)
    assert ex(other) == export_onnx(model, nobias_arch["in_shape"])


@pytest.mark.parametrize("spliced", [True, False])
def test_parameters_that_do_not_fit_are_model_errors(spliced, nobias_arch):
    spec = arch_spec(ModelConfig(arch="mlp", hidden=16), (1, 8, 8), 10) if spliced else nobias_arch
    ex = OnnxExporter(spec)
    assert ex.spliced is spliced
    params = get_params(build_model(spec, seed=0))
    name = next(iter(params))
    with pytest.raises(ModelError, match="shape"):
        ex({**params, name: params[name][:1]})
    with pytest.raises(ModelError, match="names differ|missing"):
        ex({k: v for k, v in params.items() if k != name})


def test_exporters_are_shared_per_architecture():
    spec = arch_spec(ModelConfig(arch="mlp", hidden=8), (1, 8, 8), 10)
    assert exporter_for(spec) is exporter_for(dict(reversed(list(spec.items()))))
    assert exporter_for(spec) is not exporter_for({**spec, "hidden": 9})
    with pytest.raises(ModelError, match="unknown architecture"):
        exporter_for({**spec, "arch": "nope"})
