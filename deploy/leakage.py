"""The leakage check that ends ``fogfl run``: attack a captured update of the run itself with the
attacks that apply to it, score against the testbed's ground truth, and say what leaked."""

from __future__ import annotations

import logging
from pathlib import Path

from attacks.cli import best_of, describe
from attacks.report import save_grid, save_scores
from protos.capture import CaptureError, read_capture, read_truth, truth_path

log = logging.getLogger(__name__)

# Fast attacks that apply to any dense-first capture; the check must not dominate the run.
METHODS = ["analytic"]
OPTIONS: dict[str, dict] = {}


def leakage_check(captures_dir: Path, out_dir: Path, progress: bool = False, methods: list[str] | None = None) -> dict:
    caps = sorted(Path(captures_dir).glob("*.fcap"))
    if not caps:
        return {"summary": "no captures to attack"}
    # the first round's update of the first fog: the fewest samples, the likeliest to leak
    path = caps[0]
    try:
        cap = read_capture(path)
        tx, ty = read_truth(truth_path(path))
    except CaptureError as exc:
        return {"summary": f"capture unusable: {exc}"}
    found = best_of(cap, tx, ty, methods or METHODS, OPTIONS)
    if found is None:
        return {"capture": str(path), "summary": f"no attack applies to {cap.fog_id} round {cap.round} ({cap.kind})"}
    method, rec, scores = found
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = path.name.removesuffix(".fcap")
    png = save_grid(out_dir / f"{stem}.{method}.png", tx, rec.x, rec.y, ty,
                    title=f"{method}: curious cloud vs {cap.fog_id}, round {cap.round}")
    js = save_scores(out_dir / f"{stem}.{method}.json", scores, rec.stats, capture=str(path), method=method)
    summary = (f"curious cloud ({method}) on {cap.fog_id}, round {cap.round} "
               f"({cap.kind} update, {cap.num_samples} samples): {describe(scores)}")
    return {"capture": str(path), "method": method, "fog_id": cap.fog_id, "round": cap.round,
            "num_samples": cap.num_samples, "update_kind": cap.kind, "scores": {k: v for k, v in scores.items()
                                                                               if k != "pairs"},
            "grid": str(png), "json": str(js), "summary": summary}
