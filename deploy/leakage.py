"""The leakage check that ends ``fogfl run``: a curious cloud attacks every update it captured
during the run with cheap attacks that apply (``METHODS``), scores each against the testbed's
ground truth, and reports the update that leaked most (grid + scores in the run directory) and
the total over the run."""

from __future__ import annotations

import logging
from pathlib import Path

from attacks.cli import best_of, describe, matched_views
from attacks.report import save_grid, save_scores
from protos.capture import CaptureError, read_capture, read_truth, truth_path

log = logging.getLogger(__name__)

# Cheap attacks that apply to the demo's updates; iterative ones (idlg, ig, …) are for `fogfl attack`.
METHODS = ["analytic-rows"]
OPTIONS: dict[str, dict] = {}


def leakage_check(captures_dir: Path, out_dir: Path, methods: list[str] | None = None) -> dict:
    caps = sorted(Path(captures_dir).glob("*.fcap"))
    if not caps:
        return {"summary": "no captures to attack"}
    per_update, best = [], None
    for path in caps:
        try:
            cap = read_capture(path)
            tx, ty = read_truth(truth_path(path))
        except CaptureError as exc:
            log.warning("leakage check skips %s: %s", path.name, exc)
            continue
        found = best_of(cap, tx, ty, methods or METHODS, OPTIONS)
        if found is None:
            continue
        method, rec, scores = found
        row = {"capture": path.name, "fog_id": cap.fog_id, "round": cap.round, "num_samples": cap.num_samples,
               "update_kind": cap.kind, "method": method, "recovered": scores["recovered"],
               "psnr_max": scores["psnr_max"], "label_acc": scores["label_acc"]}
        per_update.append(row)
        key = (scores["recovered"], scores["psnr_max"] or 0.0)
        if best is None or key > best[0]:
            best = (key, path, cap, method, rec, scores, tx, ty)
    if best is None:
        return {"summary": "no attack applies to the captured updates", "updates": per_update}
    _, path, cap, method, rec, scores, tx, ty = best
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = path.name.removesuffix(".fcap")
    gtx, grx, gry, gty = matched_views(scores, rec.x, rec.y, tx, ty)
    png = save_grid(out_dir / f"{stem}.{method}.png", gtx, grx, gry, gty,
                    title=f"{method}: curious cloud vs {cap.fog_id}, round {cap.round}")
    js = save_scores(out_dir / f"{stem}.{method}.json", scores, rec.stats, capture=str(path), method=method)
    total = sum(r["recovered"] for r in per_update)
    sizes = [r["num_samples"] for r in per_update]
    summary = (f"curious cloud recovered {scores['recovered']}/{cap.num_samples} samples of {cap.fog_id}, "
               f"round {cap.round}, ≥ 30 dB ({method} on a {cap.kind} update); {total} samples recovered "
               f"≥ 30 dB across all {len(per_update)} updates (each trained on {min(sizes)}–{max(sizes)} samples)")
    return {"best": {"capture": str(path), "method": method, "fog_id": cap.fog_id, "round": cap.round,
                     "num_samples": cap.num_samples, "detail": describe(scores),
                     "scores": {k: v for k, v in scores.items() if k != "pairs"}, "grid": str(png), "json": str(js)},
            "updates": per_update, "recovered_total": total, "summary": summary}
