"""Pictures and JSON for an attack's result: ground truth above, reconstructions below.

``save_grid`` draws matched pairs column by column (truth row above the reconstruction row, the
pair's PSNR under each reconstruction); without ground truth it draws the reconstructions alone.
``save_scores`` writes the scores (and the attack's stats) as JSON. Uses matplotlib's Agg backend,
so it runs headless.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from attacks.scoring import match, psnr


def _img(x: np.ndarray) -> tuple[np.ndarray, str | None]:
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    if x.ndim == 3 and x.shape[0] == 1:
        return x[0], "gray"
    if x.ndim == 3:
        return np.moveaxis(x, 0, -1), None
    return x, "gray"


def save_grid(
    path_png: Path | str,
    truth_x: np.ndarray | None,
    recon_x: np.ndarray,
    recon_y: np.ndarray | None = None,
    truth_y: np.ndarray | None = None,
    title: str | None = None,
    max_cols: int = 16,
) -> Path:
    """Write a PNG: matched truth/reconstruction pairs (at most ``max_cols`` per figure row block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recon_x = np.asarray(recon_x)
    cols: list[tuple[np.ndarray | None, np.ndarray | None, str, str]] = []
    if truth_x is not None and len(truth_x) and len(recon_x):
        truth_x = np.asarray(truth_x)
        ri, ti, mse = match(recon_x, truth_x)
        order = np.argsort(ti)
        used = set()
        for k in order:
            a, b = int(ri[k]), int(ti[k])
            used.add(b)
            tl = f"y={int(truth_y[b])}" if truth_y is not None else ""
            rl = f"y={int(recon_y[a])} " if recon_y is not None else ""
            cols.append((truth_x[b], recon_x[a], tl, f"{rl}{psnr(float(mse[a, b])):.1f} dB"))
        for b in range(len(truth_x)):
            if b not in used:
                cols.append((truth_x[b], None, f"y={int(truth_y[b])}" if truth_y is not None else "", "missed"))
    else:
        for a in range(len(recon_x)):
            cols.append((None, recon_x[a], "", f"y={int(recon_y[a])}" if recon_y is not None else ""))
    has_truth = truth_x is not None
    n = max(len(cols), 1)
    ncol = min(n, max_cols)
    blocks = math.ceil(n / ncol)
    rows_per = 2 if has_truth else 1
    fig, axes = plt.subplots(blocks * rows_per, ncol, figsize=(1.2 * ncol, 1.45 * blocks * rows_per),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, (t, r, tl, rl) in enumerate(cols):
        blk, c = divmod(j, ncol)
        if has_truth:
            ax = axes[blk * 2, c]
            if t is not None:
                im, cmap = _img(t)
                ax.imshow(im, cmap=cmap, vmin=0, vmax=1)
                ax.set_title(tl, fontsize=7)
            ax = axes[blk * 2 + 1, c]
        else:
            ax = axes[blk, c]
        if r is not None:
            im, cmap = _img(r)
            ax.imshow(im, cmap=cmap, vmin=0, vmax=1)
        ax.text(0.5, -0.08, rl, transform=ax.transAxes, ha="center", va="top", fontsize=7)
    if has_truth:
        axes[0, 0].text(-0.15, 0.5, "truth", transform=axes[0, 0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=8)
        axes[1, 0].text(-0.15, 0.5, "recon", transform=axes[1, 0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return path_png


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist() if v.size <= 4096 else f"<array {v.shape}>"
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def save_scores(path_json: Path | str, scores: dict | None, stats: dict | None = None, **extra: Any) -> Path:
    """Write ``{"scores": ..., "stats": ..., **extra}`` as JSON (numpy values converted)."""
    path_json = Path(path_json)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"scores": scores, "stats": stats or {}, **extra}
    path_json.write_text(json.dumps(_jsonable(doc), indent=2))
    return path_json
