"""Analytic attacks on captures from the real fog trainer: single-sample ratio, minimal-structure
batches (h >= B), and the two-step CNN (h >= (d/d')^2 C)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.analytic import Analytic, CnnAnalytic, MinimalStructure, recover_fc_input
from attacks.base import AttackError, get_attack
from attacks.scoring import score
from deploy.bench.bench_analytic_table import cnn_cell, minimal_cell
from deploy.cases import make_capture
from kernel.config import DataConfig
from kernel.data import load_dataset
from kernel.models import build_model, get_params
from protos.control import TrainConfig


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig())


def _mlp(h=32, act="relu"):
    return {"arch": "mlp", "in_shape": [1, 8, 8], "num_classes": 10, "hidden": h, "activation": act}


def test_registered():
    assert isinstance(get_attack("analytic"), Analytic)
    assert isinstance(get_attack("minimal"), MinimalStructure)
    assert isinstance(get_attack("cnn-analytic"), CnnAnalytic)


@pytest.mark.parametrize("train", [
    TrainConfig(update_kind="gradient"),
    TrainConfig(update_kind="delta", local_epochs=1, lr=0.1, momentum=0.9),  # one SGD step
])
def test_single_sample_is_exact_on_mlp(digits, train):
    x, y = digits.x[7:8], digits.y[7:8]
    cap = make_capture(_mlp(), x, y, train)
    rec = Analytic().reconstruct(cap)
    s = score(rec.x, rec.y, x, y)
    assert s["psnr_mean"] >= 60 and s["label_acc"] == 1.0
    assert rec.stats["rows_used"] >= 1 and rec.stats["ratio_spread"] < 1e-4


def test_single_sample_on_mnist_28x28():
    ds = load_dataset(DataConfig(dataset="mnist5k"))
    x, y = ds.x[:1], ds.y[:1]
    spec = {"arch": "mlp", "in_shape": [1, 28, 28], "num_classes": 10, "hidden": 64, "activation": "relu"}
    rec = Analytic().reconstruct(make_capture(spec, x, y))
    assert score(rec.x, rec.y, x, y)["psnr_mean"] >= 60


def test_multi_step_and_adam_deltas_are_refused(digits):
    x, y = digits.x[:1], digits.y[:1]
    cap = make_capture(_mlp(), x, y, TrainConfig(update_kind="delta", local_epochs=3, lr=0.1))
    with pytest.raises(AttackError, match="3 local steps"):
        Analytic().reconstruct(cap)
    cap = make_capture(_mlp(), x, y, TrainConfig(update_kind="delta", local_epochs=1, optimizer="adam"))
    with pytest.raises(AttackError, match="adam"):
        Analytic().reconstruct(cap)


def test_conv_first_model_points_at_cnn_analytic(digits):
    spec = {"arch": "convfc", "in_shape": [1, 8, 8], "num_classes": 10, "hidden": 16, "channels": 4}
    cap = make_capture(spec, digits.x[:1], digits.y[:1])
    with pytest.raises(AttackError, match="cnn-analytic"):
        Analytic().reconstruct(cap)


def test_batch_falls_back_to_minimal_and_reports_condition(digits):
    x, y = digits.x[20:22], digits.y[20:22]
    cap = make_capture(_mlp(16, "leaky_relu"), x, y)
    rec = Analytic(iterations=300).reconstruct(cap)
    assert rec.stats["fallback"] == "minimal" and rec.stats["condition_holds"] is True
    assert rec.stats["hidden_units"] == 16 and "grad_loss" in rec.stats
    assert rec.stats["iterations"] >= 1 or rec.stats["fixed_point_starts"] >= 1  # it did some work


def test_minimal_structure_success_when_h_ge_b_and_failure_when_h_much_smaller():
    torch.set_num_threads(1)
    ok = minimal_cell(32, 4, iterations=2000, restarts=2)  # stops early once matched (~1e-10)
    boundary = minimal_cell(4, 4, iterations=2000, restarts=2)  # h = B: still exact (row-space fixed point)
    bad = minimal_cell(1, 4, iterations=1000, restarts=1)  # unidentifiable: matching succeeds, images don't
    assert ok["condition_holds"] and ok["psnr_mean"] >= 40 and ok["success_rate"] == 1.0, ok
    assert boundary["condition_holds"] and boundary["psnr_mean"] >= 40 and boundary["success_rate"] == 1.0, boundary
    assert not bad["condition_holds"] and bad["psnr_mean"] < 20 and bad["success_rate"] == 0.0, bad


def _convfc(filters, act="leaky_relu"):
    return {"arch": "convfc", "in_shape": [1, 8, 8], "num_classes": 10, "hidden": 32, "activation": act,
            "channels": filters, "kernel": 3, "stride": 2}


def test_cnn_step1_recovers_the_conv_output_exactly(digits):
    x, y = digits.x[3:4], digits.y[3:4]
    spec = _convfc(4)
    served = get_params(build_model(spec, seed=1))
    cap = make_capture(spec, x, y, served=served)
    feats, labels, _ = recover_fc_input(cap)
    model = build_model(spec)
    from kernel.models import set_params

    set_params(model, served)
    with torch.no_grad():
        truth = model[1](model[0](torch.from_numpy(x))).reshape(1, -1).numpy()
    rel = np.abs(feats - truth).max() / np.abs(truth).max()
    assert 10 * np.log10(1 / max(rel**2, 1e-30)) >= 60  # PSNR on the feature range
    assert labels.tolist() == y.tolist()


def test_cnn_filter_condition_exact_above_and_fails_below():
    above = cnn_cell(4, "leaky_relu")
    below = cnn_cell(2, "leaky_relu")
    assert above["condition_holds"] and above["psnr"] >= 60
    assert not below["condition_holds"] and below["psnr"] < 20


def test_cnn_batch_of_two_runs_and_reports(digits):
    x, y = digits.x[30:32], digits.y[30:32]
    cap = make_capture(_convfc(8), x, y)
    rec = CnnAnalytic(iterations=200).reconstruct(cap)
    assert rec.x.shape == (2, 1, 8, 8) and rec.stats["step1"] == "minimal"
    assert rec.stats["condition_holds"] is True and "fc_condition_holds" in rec.stats
