"""Massive preset in-process: 100 fogs x 10 edges, 10 % of fogs per round. One round
(announcement, acquisition on the selected fogs' edges, local training, aggregation, evaluation)
must take <= 10 s and the process must stay under 4 GiB. The non-massive preset's round is
measured beside it as the same-run reference."""

from __future__ import annotations

import resource
import statistics
import time

from deploy.cli import CONFIG_DIR
from deploy.engine import InProcessEngine
from kernel.config import load_config


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rounds(preset: str, rounds: int, dataset: str) -> tuple[float, list[float], InProcessEngine]:
    cfg = load_config([CONFIG_DIR / "default.yaml", CONFIG_DIR / f"{preset}.yaml"],
                      [f"rounds={rounds}", f"data.dataset={dataset}"], use_env=False)
    t = time.perf_counter()
    engine = InProcessEngine(cfg, None)
    setup = time.perf_counter() - t
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        engine.run_round()
        times.append(time.perf_counter() - t)
    return setup, times, engine


def run(quick: bool = False) -> dict:
    rounds = 2 if quick else 3
    dataset = "mnist5k"  # 4 000 pool samples over 1 000 edges: 4 per edge
    ref_setup, ref_times, _ = _rounds("nonmassive", rounds, dataset)
    setup, times, engine = _rounds("massive", rounds, dataset)
    rss = _rss_mib()
    worst = max(times)
    ok = worst <= 10.0 and rss < 4096
    h = engine.cloud.history
    return {
        "fogs": engine.cfg.topology.fogs, "edges": len(engine.edges), "selected_per_round": h[-1].updates,
        "dataset": dataset,
        "setup_s": round(setup, 2), "round_s": [round(t, 3) for t in times],
        "nonmassive_round_s": [round(t, 3) for t in ref_times],
        "ratio_to_target": round(worst / 10.0, 3),
        "ratio_to_nonmassive": round(statistics.median(times) / statistics.median(ref_times), 2),
        "peak_rss_mib": round(rss, 1),
        "accuracy": [round(m.accuracy, 4) for m in h], "labels_used": [m.labels_used for m in h],
        "target": "one massive round <= 10 s in-process, peak RSS < 4 GiB",
        "pass": ok,
        "summary": f"100x10 massive round: worst {worst:.2f}s of 10s target ({worst / 10:.2f}x), "
                   f"median {statistics.median(times):.2f}s vs non-massive {statistics.median(ref_times):.2f}s; "
                   f"setup {setup:.1f}s; peak RSS {rss:.0f} MiB",
    }
