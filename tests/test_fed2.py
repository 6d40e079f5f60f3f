"""Fed2: the grouped architecture (shapes, parameter groups, class→group isolation, ONNX) and the
cloud's feature-paired averaging on toy numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.strategies import Fed2, make_strategy
from kernel.config import CloudConfig, ModelConfig
from kernel.errors import ConfigError, ModelError
from kernel.fed2 import SHARED, fed2_class_groups, fed2_param_groups
from kernel.models import arch_spec, build_model, export_onnx, get_params
from protos.control import TrainConfig


def _spec(in_shape=(1, 8, 8), groups=5, k=10, **kw):
    return {"arch": "fed2", "in_shape": list(in_shape), "num_classes": k, "groups": groups, "channels": 8,
            "hidden": 40, "activation": "relu", **kw}


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_forward_shape_and_groups_cover_every_parameter(in_shape):
    spec = _spec(in_shape)
    model = build_model(spec, seed=0)
    assert model(torch.zeros(4, *in_shape)).shape == (4, 10)
    groups = fed2_param_groups(spec)
    params = dict(model.named_parameters())
    assert list(groups) == list(params)
    for name, parts in groups.items():
        if parts[0][1] is None:
            assert len(parts) == 1
            continue
        covered = np.zeros(params[name].shape[0], dtype=int)
        for _, sl in parts:
            covered[sl] += 1
        assert (covered == 1).all(), name  # the slices partition dimension 0
    assert {g for parts in groups.values() for g, _ in parts} == {SHARED, 0, 1, 2, 3, 4}


def test_arch_spec_carries_groups_and_bad_group_counts_are_rejected():
    spec = arch_spec(ModelConfig(arch="fed2", groups=3), (1, 8, 8), 10)
    assert spec["groups"] == 3
    assert build_model(spec)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    with pytest.raises(ModelError, match="groups"):
        build_model(_spec(groups=11))
    with pytest.raises(ModelError, match="group_assign"):
        build_model(_spec(group_assign="random"))


def test_class_to_group_allocation():
    assert fed2_class_groups(_spec()) == [[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]]
    assert fed2_class_groups(_spec(groups=4, group_assign="block")) == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]
    assert fed2_class_groups(_spec(groups=3, k=7)) == [[0, 3, 6], [1, 4], [2, 5]]


@pytest.mark.parametrize("assign", ["mod", "block"])
def test_a_class_logit_reaches_only_its_own_group(assign):
    """The gradient of class c's logit is zero in every other group's parameters (whole tensors
    and slices of the grouped convolutions) and non-zero in its own group and the shared layers."""
    spec = _spec(groups=5, group_assign=assign)
    model = build_model(spec, seed=1)
    groups = fed2_param_groups(spec)
    cls_groups = fed2_class_groups(spec)
    x = torch.rand(3, 1, 8, 8)
    for c in range(10):
        gc = next(j for j, cl in enumerate(cls_groups) if c in cl)
        model.zero_grad()
        model(x)[:, c].sum().backward()
        for name, p in model.named_parameters():
            for g, sl in groups[name]:
                if g in (gc, SHARED):
                    continue
                grad = p.grad if sl is None else p.grad[sl]
                assert torch.count_nonzero(grad) == 0, (c, name, g)
        own = [p.grad[sl] if sl is not None else p.grad for name, p in model.named_parameters()
               for g, sl in groups[name] if g == gc]
        assert all(torch.count_nonzero(t) > 0 for t in own), c
        assert torch.count_nonzero(model.shared[0].weight.grad) > 0


def test_cross_entropy_sample_of_class_c_trains_only_c_positive_path():
    """Under softmax cross-entropy, the other groups receive only the softmax push-down: their
    gradient equals that of sum_k p_k z_k over their classes (no term from the true label)."""
    spec = _spec(groups=5)
    model = build_model(spec, seed=2)
    x = torch.rand(1, 1, 8, 8)
    y = torch.tensor([3])
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    ce = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    z = model(x)
    p = torch.softmax(z, 1).detach()
    (p * z).sum().backward()  # the same gradient without the -z_y term
    other = [n for n in ce if n.startswith("heads.") and int(n.split(".")[1]) != 3 % 5]
    assert other
    for n in other:
        torch.testing.assert_close(ce[n], dict(model.named_parameters())[n].grad)


def test_fed2_exports_to_onnx_with_the_same_logits():
    ort = pytest.importorskip("onnxruntime")
    spec = _spec()
    model = build_model(spec, seed=3).eval()
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    sess = ort.InferenceSession(export_onnx(model, spec["in_shape"]))
    out = sess.run(["logits"], {"x": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


# ----------------------------------------------------------------------------- paired averaging
def _toy():
    spec = _spec(groups=2, k=4, channels=4, hidden=8, group_channels=2)  # groups {0, 2} and {1, 3}
    g = {k: np.zeros_like(v) for k, v in get_params(build_model(spec, seed=0)).items()}
    return spec, g


def _const(g, value):
    return {k: np.full_like(v, value) for k, v in g.items()}


def _values(out, spec, group):
    """All entries of the output that belong to ``group``."""
    vals = []
    for name, parts in fed2_param_groups(spec).items():
        for gr, sl in parts:
            if gr == group:
                vals.append((out[name] if sl is None else out[name][sl]).ravel())
    return np.concatenate(vals)


def test_feature_paired_averaging_on_toy_numbers():
    spec, g = _toy()
    s = Fed2(weighting="classes")
    s.begin_round(g, spec)
    # fog A: 4 samples, all of group 0's classes; fog B: 5 samples, group 1's; fog C: 2 of each group
    s.add_update("fog-a", _const(g, 1.0), 4, "delta", {"label_counts": {0: 3, 2: 1}})
    s.add_update("fog-b", _const(g, 3.0), 5, "delta", {"label_counts": {"1": 5}})
    s.add_update("fog-c", _const(g, 10.0), 4, "delta", {"label_counts": {0: 2, 3: 2}})
    out = s.end_round(1.0)
    np.testing.assert_allclose(_values(out, spec, SHARED), (4 * 1 + 5 * 3 + 4 * 10) / 13, rtol=1e-6)
    np.testing.assert_allclose(_values(out, spec, 0), (4 * 1 + 2 * 10) / 6, rtol=1e-6)
    np.testing.assert_allclose(_values(out, spec, 1), (5 * 3 + 2 * 10) / 7, rtol=1e-6)


def test_fed2_falls_back_to_sample_counts_and_keeps_untrained_groups():
    spec, g = _toy()
    base = {k: np.full_like(v, 0.5) for k, v in g.items()}
    s = Fed2(weighting="classes")
    s.begin_round(base, spec)
    s.add_update("fog-a", _const(g, 1.0), 4, "delta", {"label_counts": {0: 4}})
    s.add_update("fog-b", _const(g, 4.0), 2, "delta", {})  # no counts: weighted by its 2 samples
    out = s.end_round(1.0)
    np.testing.assert_allclose(_values(out, spec, 0), 0.5 + (4 * 1 + 2 * 4) / 6, rtol=1e-6)
    np.testing.assert_allclose(_values(out, spec, 1), 0.5 + 4.0, rtol=1e-6)  # only fog-b counted
    # a group no fog has samples of keeps its global value; gradient kind uses server_lr
    s.begin_round(base, spec)
    s.add_update("fog-a", _const(g, 1.0), 4, "gradient", {"label_counts": {0: 4}})
    out = s.end_round(0.1)
    np.testing.assert_allclose(_values(out, spec, 0), 0.5 - 0.1, rtol=1e-6)
    np.testing.assert_allclose(_values(out, spec, SHARED), 0.5 - 0.1, rtol=1e-6)
    np.testing.assert_allclose(_values(out, spec, 1), 0.5)


def test_fed2_smoothing_and_masked_rounds():
    spec, g = _toy()
    s = Fed2(weighting="classes", smoothing=1.0)  # each group also gets num_samples / G of every fog
    s.begin_round(g, spec)
    s.add_update("fog-a", _const(g, 1.0), 4, "delta", {"label_counts": {0: 4}})
    s.add_update("fog-b", _const(g, 3.0), 4, "delta", {"label_counts": {1: 4}})
    out = s.end_round(1.0)
    np.testing.assert_allclose(_values(out, spec, 0), (6 * 1 + 2 * 3) / 8, rtol=1e-6)
    s = Fed2(weighting="classes")  # masked: no per-class weights, sum / total samples
    s.begin_round(g, spec)
    s.add_update("fog-a", _const(g, 4.0), 4, "delta", {"masked": True, "label_counts": {0: 4}})
    s.add_update("fog-b", _const(g, 12.0), 4, "delta", {"masked": True})
    out = s.end_round(1.0)
    for grp in (SHARED, 0, 1):
        np.testing.assert_allclose(_values(out, spec, grp), 2.0, rtol=1e-6)


def test_fed2_samples_and_features_weightings():
    """samples (the default) is FedAvg on the grouped net; features weights only the grouped
    convolutions' group slices by class counts and the heads by samples."""
    from cloud.strategies import FedAvg

    spec, g = _toy()
    ups = [(_const(g, 1.0), 4, {"label_counts": {0: 4}}), (_const(g, 3.0), 2, {"label_counts": {1: 2}})]
    out = {}
    for key, strat in [("samples", Fed2()), ("features", Fed2(weighting="features")), ("fedavg", FedAvg())]:
        strat.begin_round(g, spec)
        for i, (u, n, meta) in enumerate(ups):
            strat.add_update(f"fog-{i}", u, n, "delta", meta)
        out[key] = strat.end_round(1.0)
    for k in g:
        np.testing.assert_array_equal(out["samples"][k], out["fedavg"][k])
    by_samples = (4 * 1 + 2 * 3) / 6
    groups = fed2_param_groups(spec)
    for name, parts in groups.items():
        for grp, sl in parts:
            v = out["features"][name] if sl is None else out["features"][name][sl]
            if name.startswith(("split.", "gconv.")):
                np.testing.assert_allclose(v, 1.0 if grp == 0 else 3.0, rtol=1e-6)
            else:
                np.testing.assert_allclose(v, by_samples, rtol=1e-6)


def test_fed2_strategy_needs_the_fed2_architecture():
    s = make_strategy(CloudConfig(strategy="fed2"), TrainConfig())
    assert isinstance(s, Fed2)
    with pytest.raises(ConfigError, match="arch=fed2"):
        s.begin_round({"w": np.zeros(2, np.float32)}, {"arch": "mlp"})
