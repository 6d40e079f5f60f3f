"""A networked round (processes, MQTT, gRPC) vs the same round in-process, small preset.
Per-round wall time as the cloud measures it (announcement to aggregated and evaluated model);
round 1 (ONNX sessions and modAL warming up in every process) is reported apart and excluded from
the ratio. Target: networked <= 1.5x in-process."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from deploy.cli import CONFIG_DIR
from deploy.engine import InProcessEngine
from deploy.launcher import run as launch
from kernel.config import load_config


def run_bench(quick: bool = False) -> dict:
    rounds = 4 if quick else 8
    cfg = load_config([CONFIG_DIR / "default.yaml", CONFIG_DIR / "small.yaml"], [f"rounds={rounds}"], use_env=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        launch(cfg, out=str(Path(tmp) / "net"), engine="network", attack=False, quiet=True)
        net_total = time.perf_counter() - t0
        net = json.loads((Path(tmp) / "net" / "metrics.json").read_text())
    net_rounds = [r["wall_s"] for r in net["rounds"]]
    engine = InProcessEngine(cfg, None)
    inp_rounds = []
    for _ in range(rounds):
        t = time.perf_counter()
        engine.run_round()
        inp_rounds.append(time.perf_counter() - t)
    n_med, i_med = statistics.median(net_rounds[1:]), statistics.median(inp_rounds[1:])
    ratio = n_med / i_med
    return {
        "rounds": rounds,
        "network_round_s": [round(v, 4) for v in net_rounds],
        "inprocess_round_s": [round(v, 4) for v in inp_rounds],
        "network_total_s": round(net_total, 2),
        "median_round_s": {"network": round(n_med, 4), "inprocess": round(i_med, 4)},
        "ratio": round(ratio, 3),
        "target": "network round <= 1.5x in-process round (median of rounds 2..N)",
        "pass": ratio <= 1.5,
        "summary": f"networked round {n_med * 1000:.0f} ms vs in-process {i_med * 1000:.0f} ms: {ratio:.2f}x "
                   f"(round 1: {net_rounds[0]:.2f}s vs {inp_rounds[0]:.2f}s; whole networked run {net_total:.1f}s)",
    }


def run(quick: bool = False) -> dict:
    return run_bench(quick)
