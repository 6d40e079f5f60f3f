"""``fogfl attack CAPTURE --method NAME``: reconstruct, score against ground truth if present,
write ``<stem>.<method>.png`` (truth above reconstruction) and ``<stem>.<method>.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from attacks.base import AttackError, Reconstruction, get_attack
from attacks.report import save_grid, save_scores
from attacks.scoring import score
from protos.capture import Capture, read_capture, read_truth, truth_path

log = logging.getLogger(__name__)


def _coerce(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


BUILTIN_PRIORS = ("digits", "mnist5k")


def prior_for(cap: Capture) -> str | None:
    """The dataset-mean prior for relative leakage when the capture names a built-in dataset;
    otherwise None (scoring then uses the ground-truth batch mean, and says so)."""
    name = cap.arch.get("dataset")
    return name if name in BUILTIN_PRIORS else None


def run_attack(capture: Capture, method: str, options: dict | None = None, progress: bool = False) -> Reconstruction:
    attack = get_attack(method, **{k: _coerce(v) if isinstance(v, str) else v for k, v in (options or {}).items()})
    if not progress:
        return attack.reconstruct(capture)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{method}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(method, total=None, info="")

        def cb(done: int, total: int, info: dict) -> None:
            loss = info.get("loss")
            bar.update(task, completed=done, total=total, info=f"loss {loss:.3g}" if isinstance(loss, float) else "")

        return attack.reconstruct(capture, progress=cb)


def attack_capture(capture_path: str | Path, method: str, truth: str | Path | None = None,
                   out: str | Path | None = None, options: dict | None = None, progress: bool = True) -> dict:
    capture_path = Path(capture_path)
    cap = read_capture(capture_path)
    truth_file = Path(truth) if truth else truth_path(capture_path)
    tx = ty = None
    if truth or truth_file.exists():
        tx, ty = read_truth(truth_file)
    rec = run_attack(cap, method, options, progress)
    scores = None
    if tx is not None:
        if tx.shape[1:] != rec.x.shape[1:]:
            raise AttackError(f"ground truth images {tx.shape[1:]} do not match the capture's {rec.x.shape[1:]}")
        scores = score(rec.x, rec.y, tx, ty, prior=prior_for(cap))
    out_dir = Path(out) if out else capture_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = capture_path.name.removesuffix(".fcap")
    gtx, grx, gry, gty = matched_views(scores, rec.x, rec.y, tx, ty)
    png = save_grid(out_dir / f"{stem}.{method}.png", gtx, grx, gry, gty,
                    title=f"{method} on {cap.fog_id} round {cap.round} ({cap.kind}, {cap.num_samples} samples)")
    js = save_scores(out_dir / f"{stem}.{method}.json", scores, rec.stats, capture=str(capture_path),
                     method=method, fog_id=cap.fog_id, round=cap.round)
    line = f"{method}: {len(rec.x)} reconstruction(s) from {cap.fog_id} round {cap.round}"
    if scores:
        line += "; " + describe(scores)
    print(line)
    print(f"grid: {png}\nscores: {js}")
    return {"scores": scores, "stats": rec.stats, "png": str(png), "json": str(js)}


def matched_views(scores: dict | None, rec_x, rec_y, tx, ty, limit: int = 32):
    """The matched (truth, reconstruction) pairs, best PSNR first, for a readable grid."""
    if scores is None or tx is None or not scores.get("pairs"):
        return tx, rec_x, rec_y, ty
    pairs = sorted(scores["pairs"], key=lambda p: -p["psnr"])[:limit]
    ri = [p["recon"] for p in pairs]
    ti = [p["truth"] for p in pairs]
    return tx[ti], rec_x[ri], (rec_y[ri] if rec_y is not None else None), (ty[ti] if ty is not None else None)


def describe(scores: dict) -> str:
    """One line: samples recovered, PSNR, label accuracy."""
    text = f"recovered {scores['recovered']}/{scores['num_truth']} at ≥ 30 dB"
    if scores.get("psnr_mean") is not None:
        text += f", PSNR mean {scores['psnr_mean']:.1f} dB (max {scores['psnr_max']:.1f})"
    if scores.get("label_acc") is not None:
        text += f", label accuracy {scores['label_acc']:.2f}"
    return text


def best_of(capture: Capture, tx: np.ndarray, ty: np.ndarray, methods: list[str], options: dict[str, dict]) -> tuple[str, Reconstruction, dict] | None:
    """Run several attacks, keep the one with the most samples recovered (then the best mean PSNR)."""
    best = None
    for m in methods:
        try:
            rec = get_attack(m, **options.get(m, {})).reconstruct(capture)
        except AttackError as exc:
            log.info("%s does not apply: %s", m, exc)
            continue
        s = score(rec.x, rec.y, tx, ty, prior=prior_for(capture))
        key = (s["recovered"], s["psnr_mean"] or 0.0)
        if best is None or key > best[0]:
            best = (key, m, rec, s)
    return None if best is None else best[1:]
