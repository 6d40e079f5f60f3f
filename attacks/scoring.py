"""Leakage scoring: how close reconstructions are to the ground truth the testbed kept.

Settings (fixed, so numbers are comparable across attacks and runs):

- **Matching**: reconstructions and ground-truth samples are paired by an optimal assignment
  (``scipy.optimize.linear_sum_assignment``) on the pairwise pixel MSE. When the counts differ,
  ``min(R, T)`` pairs are matched; unmatched ground-truth samples count as not recovered.
- **MSE** over all pixels (and channels) of a pair; images are in [0, 1].
- **PSNR** = 10·log10(1 / MSE) (data range 1). An exact reconstruction (MSE < 1e-10) is capped at
  ``PSNR_CAP`` = 100 dB so that means stay finite.
- **SSIM**: ``skimage.metrics.structural_similarity`` with ``data_range=1``, uniform (not Gaussian)
  window of ``win_size = 7`` when the smaller image side is ≥ 16 px, else ``3`` (for 8×8 digits a
  7×7 window leaves only 2×2 valid positions, too few to be meaningful), computed per channel
  (``channel_axis``) for multi-channel images and averaged.
- **Label accuracy** over matched pairs; a reconstruction label of -1 (unknown) counts as wrong.
- **Success rate**: matched pairs with PSNR ≥ 30 dB, divided by the number of ground-truth samples.
- **Relative leakage** (NVIDIA FLARE's RDLV): per matched pair
  ``(SSIM(recon, x) − SSIM(prior, x)) / SSIM(prior, x)``, reported as the max over the batch (and
  the mean). The prior is an image: the dataset mean image when given a dataset name (see
  :func:`dataset_prior`), or an explicit array; with ``prior=None`` the mean image of the
  ground-truth batch is used (a weaker prior, said in the result's ``prior`` field). The
  denominator is floored at 1e-3 in absolute value to keep the ratio finite.

All returned numbers are plain Python floats/ints (JSON-able).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

PSNR_CAP = 100.0
SUCCESS_PSNR = 30.0
_MIN_MSE = 1e-10


def psnr(mse: float) -> float:
    return PSNR_CAP if mse < _MIN_MSE else min(PSNR_CAP, 10.0 * math.log10(1.0 / mse))


def ssim_win(shape: tuple[int, ...]) -> int:
    """Window size used for images of ``shape`` (C, H, W) or (H, W)."""
    side = min(shape[-2:])
    if side >= 16:
        return 7
    return 3 if side >= 3 else 1


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two images (C, H, W) or (H, W) in [0, 1] with the module's settings."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a, b = a[0], b[0]
    win = ssim_win(a.shape)
    if a.ndim == 3:
        return float(structural_similarity(np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1), win_size=win,
                                           data_range=1.0, channel_axis=-1))
    return float(structural_similarity(a, b, win_size=win, data_range=1.0))


@lru_cache(maxsize=8)
def _prior_cached(name: str) -> np.ndarray:
    from kernel.config import DataConfig
    from kernel.data import load_dataset

    return load_dataset(DataConfig(dataset=name)).x.mean(axis=0)


def dataset_prior(name: str) -> np.ndarray:
    """Mean image of a built-in dataset (``digits``, ``mnist5k``, ...), shape (C, H, W)."""
    return _prior_cached(name).copy()


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def match(recon_x: np.ndarray, truth_x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal pairing on MSE: (recon indices, truth indices, pairwise MSE matrix R×T)."""
    r, t = _flat(recon_x), _flat(truth_x)
    d = r.shape[1]
    mse = ((r**2).sum(1)[:, None] + (t**2).sum(1)[None, :] - 2.0 * r @ t.T) / d
    mse = np.maximum(mse, 0.0)
    ri, ti = linear_sum_assignment(mse)
    return ri, ti, mse


def score(
    recon_x: np.ndarray,
    recon_y: np.ndarray | None,
    truth_x: np.ndarray,
    truth_y: np.ndarray | None,
    prior: np.ndarray | str | None = None,
) -> dict:
    """Score reconstructions (R, C, H, W) against ground truth (T, C, H, W); see the module doc."""
    recon_x = np.clip(np.asarray(recon_x, dtype=np.float64), 0.0, 1.0)
    truth_x = np.asarray(truth_x, dtype=np.float64)
    if recon_x.ndim == 3:
        recon_x = recon_x[:, None]
    if truth_x.ndim == 3:
        truth_x = truth_x[:, None]
    if recon_x.shape[1:] != truth_x.shape[1:]:
        raise ValueError(f"image shapes differ: reconstruction {recon_x.shape[1:]} vs truth {truth_x.shape[1:]}")
    n_truth, n_recon = len(truth_x), len(recon_x)
    if isinstance(prior, str):
        prior_img, prior_name = dataset_prior(prior).astype(np.float64), f"dataset mean ({prior})"
    elif prior is None:
        prior_img, prior_name = truth_x.mean(axis=0), "ground-truth batch mean"
    else:
        prior_img, prior_name = np.asarray(prior, dtype=np.float64).reshape(truth_x.shape[1:]), "given"

    out: dict = {"num_truth": n_truth, "num_recon": n_recon, "prior": prior_name,
                 "ssim_win": ssim_win(truth_x.shape[1:]), "psnr_cap": PSNR_CAP, "success_psnr": SUCCESS_PSNR}
    if n_truth == 0 or n_recon == 0:
        out.update(matched=0, pairs=[], mse_mean=None, psnr_mean=None, psnr_max=None, ssim_mean=None,
                   ssim_max=None, label_acc=None, success_rate=0.0, recovered=0,
                   relative_leakage_max=None, relative_leakage_mean=None)
        return out
    ri, ti, mse_m = match(recon_x, truth_x)
    ry = None if recon_y is None else np.asarray(recon_y).reshape(-1)
    ty = None if truth_y is None else np.asarray(truth_y).reshape(-1)
    pairs = []
    for a, b in zip(ri.tolist(), ti.tolist(), strict=True):
        m = float(mse_m[a, b])
        s = ssim(recon_x[a], truth_x[b])
        s_prior = ssim(prior_img, truth_x[b])
        denom = s_prior if abs(s_prior) >= 1e-3 else math.copysign(1e-3, s_prior or 1.0)
        pair = {"recon": int(a), "truth": int(b), "mse": m, "psnr": psnr(m), "ssim": s,
                "ssim_prior": s_prior, "relative_leakage": (s - s_prior) / denom}
        if ry is not None and ty is not None:
            pair["label_recon"] = int(ry[a])
            pair["label_truth"] = int(ty[b])
            pair["label_ok"] = bool(ry[a] >= 0 and ry[a] == ty[b])
        pairs.append(pair)
    ps = np.array([p["psnr"] for p in pairs])
    ss = np.array([p["ssim"] for p in pairs])
    rl = np.array([p["relative_leakage"] for p in pairs])
    ok = int((ps >= SUCCESS_PSNR).sum())
    out.update(
        matched=len(pairs),
        pairs=pairs,
        mse_mean=float(np.mean([p["mse"] for p in pairs])),
        psnr_mean=float(ps.mean()),
        psnr_min=float(ps.min()),
        psnr_max=float(ps.max()),
        ssim_mean=float(ss.mean()),
        ssim_max=float(ss.max()),
        label_acc=(float(np.mean([p["label_ok"] for p in pairs])) if ry is not None and ty is not None else None),
        success_rate=ok / n_truth,
        recovered=ok,
        relative_leakage_max=float(rl.max()),
        relative_leakage_mean=float(rl.mean()),
    )
    return out
