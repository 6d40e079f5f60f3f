"""Gradient-matching attacks (attacks.gradient_matching) and the differentiable re-run of the fog's
local training they rely on (attacks.simulate), against captures from the real fog trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attacks.gradient_matching as gm
from attacks.base import REGISTRY, AttackError
from attacks.scoring import score
from attacks.simulate import SimSpec, Victim, schedule, simulate, target_update
from deploy.bench.bench_attacks import SPEC, digit_batch
from deploy.cases import make_capture
from protos.control import TrainConfig

GRAD = TrainConfig(update_kind="gradient")


def _cap(batch: int, seed: int, train: TrainConfig = GRAD, spec: dict = SPEC):
    x, y = digit_batch(seed, batch)
    return make_capture(spec, x, y, train, seed=seed), x, y


def test_attacks_are_registered():
    assert {"dlg", "idlg", "ig", "wdlg"} <= set(REGISTRY)
    with pytest.raises(AttackError, match="unknown option"):
        REGISTRY["idlg"](iterationz=3)


def test_idlg_batch1_digits_labels_exact_and_images_recovered():
    psnrs = []
    for seed in range(4):
        cap, x, y = _cap(1, seed)
        rec = REGISTRY["idlg"](seed=seed).reconstruct(cap)
        sc = score(rec.x, rec.y, x, y)
        assert sc["label_acc"] == 1.0
        assert rec.stats["label_source"] == "idlg-weight-rows"
        psnrs.append(sc["psnr_max"])
    assert sum(p >= 30 for p in psnrs) >= 3, psnrs


def test_dlg_runs_and_returns_shapes():
    cap, x, y = _cap(2, 0)
    seen = []
    rec = REGISTRY["dlg"](seed=0, iterations=3, inner=5, progress_every=1).reconstruct(
        cap, lambda d, t, info: seen.append((d, t, info["loss"], info["x"].shape)))
    assert rec.x.shape == (2, 1, 8, 8) and rec.x.dtype == np.float32
    assert rec.y.shape == (2,) and rec.y.dtype == np.int64
    assert 0.0 <= rec.x.min() and rec.x.max() <= 1.0
    assert seen and seen[0][1] == 3 and seen[0][3] == (2, 1, 8, 8)
    assert np.isfinite(rec.stats["loss"]) and rec.stats["label_source"] == "joint-soft-label"


def test_wasserstein_distance_zero_iff_equal_and_keeps_coordinates():
    g = [torch.randn(12, 1, 5, 5, dtype=torch.float64), torch.randn(10, dtype=torch.float64)]
    assert float(gm.kr_distance(g, [t.clone() for t in g])) == 0.0
    assert float(gm.sliced_distance(g, [t.clone() for t in g])) == 0.0
    other = [t + 0.01 * torch.randn_like(t) for t in g]
    assert float(gm.kr_distance(other, g)) > 0.0
    # a permutation of the same values: a value-set distance would say 0, ours must not
    perm = [t.flatten()[torch.randperm(t.numel())].reshape(t.shape) for t in g]
    assert float(gm.kr_distance(perm, g)) > 0.0
    assert float(gm.sliced_distance(perm, g)) > 0.0
    # differentiable: finite gradient towards the real gradient
    d = [t.clone().requires_grad_(True) for t in other]
    gm.kr_distance(d, g).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in d)


def test_wdlg_recovers_a_digit_and_offers_the_kr_distance():
    cap, x, y = _cap(1, 1)
    rec = REGISTRY["wdlg"](seed=1).reconstruct(cap)
    assert rec.stats["distance"] == "sliced-w2-rows+l2"
    sc = score(rec.x, rec.y, x, y)
    assert sc["label_acc"] == 1.0 and sc["psnr_max"] >= 30.0
    losses = []
    rec = REGISTRY["wdlg"](seed=1, distance="kr", iterations=5, progress_every=1).reconstruct(
        cap, lambda d, t, info: losses.append(info["loss"]))
    assert rec.stats["distance"] == "wasserstein-kr-rows" and losses[-1] < losses[0]
    with pytest.raises(AttackError, match="unknown distance"):
        REGISTRY["wdlg"](distance="emd")


@pytest.mark.parametrize("train", [
    TrainConfig(update_kind="delta", local_epochs=3, batch_size=4, lr=0.05, momentum=0.9),
    TrainConfig(update_kind="delta", local_epochs=2, batch_size=3, lr=0.1, momentum=0.5, shuffle=False, prox_mu=0.1),
    TrainConfig(update_kind="delta", local_epochs=2, batch_size=4, lr=0.01, optimizer="adam"),
    TrainConfig(update_kind="delta", local_epochs=1, batch_size=2, lr=0.05, momentum=0.9, shuffle=True),
])
def test_simulation_reproduces_the_fog_trainer(train):
    x, y = digit_batch(5, 4)
    cap = make_capture(SPEC, x, y, train, seed=5)
    spec = SimSpec.from_capture(cap)
    if train.shuffle and train.batch_size < len(x):
        # one shuffled epoch = in-order batches of the permuted samples (the trainer's permutation)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(5)).numpy()
        x, y = x[order], y[order]
    v = Victim(cap, torch.float64)
    sim = simulate(v, spec, torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y), schedule(spec))
    tgt = target_update(v, spec, cap)
    # Adam divides by sqrt(v) + 1e-8, which magnifies float32-vs-float64 differences of tiny gradients
    tol = 1e-3 if train.optimizer == "adam" else 1e-5
    for a, b in zip(sim, tgt, strict=True):
        assert torch.allclose(a.detach(), b, rtol=1e-4, atol=tol * float(b.abs().max()) + 1e-7)


def test_single_sgd_step_delta_is_the_gradient_and_shuffled_epochs_need_assumption():
    x, y = digit_batch(6, 3)
    grad = make_capture(SPEC, x, y, GRAD, seed=6)
    step = make_capture(SPEC, x, y, TrainConfig(update_kind="delta", local_epochs=1, batch_size=8, lr=0.1), seed=6)
    for k in grad.update:
        np.testing.assert_allclose(-step.update[k] / 0.1, grad.update[k], rtol=1e-3, atol=1e-5)
    shuffled = make_capture(SPEC, x, y, TrainConfig(update_kind="delta", local_epochs=2, batch_size=2), seed=6)
    with pytest.raises(AttackError, match="assume_full_batch"):
        REGISTRY["ig"](iterations=1, restarts=1).reconstruct(shuffled)
    rec = REGISTRY["ig"](iterations=2, restarts=1, assume_full_batch=True).reconstruct(shuffled)
    assert rec.x.shape == (3, 1, 8, 8)


def test_batch_label_inference_counts_repeated_labels():
    x, y = digit_batch(1, 4)  # holds a repeated label
    assert len(set(y.tolist())) < 4
    cap = make_capture(SPEC, x, y, GRAD, seed=0)
    labels, source = gm.infer_labels(gm.make_problem(cap))
    assert source == "bias-counts"
    assert sorted(labels.tolist()) == sorted(y.tolist())
    # the header's label counts, when the fog sent them, win
    cap.message.header.label_counts.clear()
    cap.message.header.label_counts.update({int(c): int((y == c).sum()) for c in set(y.tolist())})
    labels, source = gm.infer_labels(gm.make_problem(cap))
    assert source == "header" and sorted(labels.tolist()) == sorted(y.tolist())


def test_inverting_gradients_on_a_two_step_delta_beats_a_random_guess():
    train = TrainConfig(update_kind="delta", local_epochs=2, batch_size=4, lr=0.05, momentum=0.9)
    x, y = digit_batch(101, 4)
    cap = make_capture(SPEC, x, y, train, seed=1)
    assert cap.hparams.steps == 2
    rec = REGISTRY["ig"](seed=1, iterations=300, restarts=1).reconstruct(cap)
    sc = score(rec.x, rec.y, x, y)
    guess = np.random.default_rng(0).random(x.shape).astype(np.float32)
    base = score(guess, None, x, y)
    assert sc["psnr_mean"] > base["psnr_mean"] + 10.0, (sc["psnr_mean"], base["psnr_mean"])
    assert sc["label_acc"] == 1.0


def test_label_orders_deal_the_multiset_into_mini_batches():
    batches = [slice(0, 2), slice(2, 4), slice(0, 2), slice(2, 4)]  # 2 epochs of 2 in-order batches
    orders = gm.label_orders(np.array([0, 1, 4, 5]), batches, limit=100)
    assert len(orders) == 6  # which 2 of the 4 labels train in the first batch
    assert len(gm.label_orders(np.array([0, 1, 4, 5]), batches, limit=4)) == 4
    assert len(gm.label_orders(np.array([3, 3, 3, 3]), batches, limit=100)) == 1
    assert len(gm.label_orders(np.array([0, 1, 4, 5]), [slice(0, 4)] * 3, limit=100)) == 1
