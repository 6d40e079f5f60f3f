"""Leakage scoring: matching, PSNR/SSIM settings, label accuracy, relative leakage, report files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attacks.report import save_grid, save_scores
from attacks.scoring import PSNR_CAP, psnr, score, ssim, ssim_win
from kernel.config import DataConfig
from kernel.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset(DataConfig())
    return ds.x[:6], ds.y[:6]


def test_exact_reconstruction_in_shuffled_order_is_matched_and_capped(digits):
    x, y = digits
    perm = np.array([3, 0, 5, 1, 4, 2])
    s = score(x[perm], y[perm], x, y)
    assert s["matched"] == 6
    assert all(p["truth"] == perm[p["recon"]] for p in s["pairs"])
    assert s["psnr_mean"] == PSNR_CAP and s["ssim_mean"] == pytest.approx(1.0)
    assert s["label_acc"] == 1.0 and s["success_rate"] == 1.0
    json.dumps(s)  # plain JSON-able


def test_psnr_matches_definition_and_noise_lowers_scores(digits):
    x, y = digits
    rng = np.random.default_rng(0)
    noisy = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    s = score(noisy, y, x, y)
    mse = ((noisy - x) ** 2).reshape(6, -1).mean(1)
    assert s["psnr_mean"] == pytest.approx(np.mean([10 * np.log10(1 / m) for m in mse]), rel=1e-6)
    assert 20 < s["psnr_mean"] < 35 and s["ssim_mean"] < 0.99
    assert psnr(1e-3) == pytest.approx(30.0)


def test_unknown_labels_are_wrong_and_fewer_recons_count_as_missed(digits):
    x, y = digits
    s = score(x[:3], np.array([-1, y[1], y[2]]), x, y)
    assert s["matched"] == 3 and s["num_truth"] == 6
    assert s["label_acc"] == pytest.approx(2 / 3)
    assert s["success_rate"] == pytest.approx(3 / 6)


def test_more_recons_than_truth_uses_the_best(digits):
    x, y = digits
    junk = np.full((4, *x.shape[1:]), 0.5, dtype=np.float32)
    s = score(np.concatenate([junk, x[:2]]), None, x[:2], y[:2])
    assert s["matched"] == 2 and s["psnr_min"] == PSNR_CAP and s["label_acc"] is None


def test_relative_leakage_is_zero_for_the_prior_and_positive_for_truth(digits):
    x, y = digits
    prior = load_dataset(DataConfig()).x.mean(0)
    s_prior = score(np.repeat(prior[None], 6, 0), None, x, y, prior=prior)
    assert s_prior["relative_leakage_max"] == pytest.approx(0.0, abs=1e-9)
    s_true = score(x, y, x, y, prior="digits")
    assert s_true["relative_leakage_max"] > 0.5 and s_true["prior"].startswith("dataset mean")


def test_ssim_window_choice_and_rgb():
    assert ssim_win((1, 8, 8)) == 3 and ssim_win((1, 28, 28)) == 7
    rng = np.random.default_rng(1)
    a = rng.random((3, 32, 32))
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, rng.random((3, 32, 32))) < 0.2


def test_report_writes_png_and_json(tmp_path, digits):
    x, y = digits
    rec = np.clip(x[::-1] + 0.02, 0, 1)
    s = score(rec, y[::-1], x, y)
    png = save_grid(tmp_path / "g.png", x, rec, y[::-1], y, title="t")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    save_grid(tmp_path / "solo.png", None, rec)
    path = save_scores(tmp_path / "s.json", s, {"iterations": np.int64(3), "x": np.zeros(2)})
    doc = json.loads(path.read_text())
    assert doc["scores"]["matched"] == 6 and doc["stats"]["iterations"] == 3
