"""A networked round (processes, MQTT, gRPC) vs the same round in-process, small preset.
Per-round wall time as the cloud measures it (announcement to aggregated and evaluated model);
round 1 (ONNX sessions and modAL warming up in every process) is reported apart and excluded from
the ratio. Target: networked <= 1.5x in-process."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from deploy.broker import free_port
from deploy.cli import CONFIG_DIR
from deploy.engine import InProcessEngine
from deploy.launcher import run as launch
from kernel.config import load_config


def _mosquitto(tmp: Path) -> tuple[subprocess.Popen, int] | None:
    """Mosquitto on a free loopback port, if installed (the broker deployments use)."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        return None
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, port


def run_bench(quick: bool = False) -> dict:
    rounds = 4 if quick else 8
    cfg = load_config([CONFIG_DIR / "default.yaml", CONFIG_DIR / "small.yaml"], [f"rounds={rounds}"], use_env=False)
    with tempfile.TemporaryDirectory() as tmp:
        broker = _mosquitto(Path(tmp))
        if broker is not None:
            cfg.mqtt.host, cfg.mqtt.port = "127.0.0.1", broker[1]
        try:
            t0 = time.perf_counter()
            launch(cfg, out=str(Path(tmp) / "net"), engine="network", attack=False, quiet=True)
            net_total = time.perf_counter() - t0
        finally:
            if broker is not None:
                broker[0].terminate()
                broker[0].wait(5)
        net = json.loads((Path(tmp) / "net" / "metrics.json").read_text())
    net_rounds = [r["wall_s"] for r in net["rounds"]]
    inp_dir = tempfile.TemporaryDirectory()
    engine = InProcessEngine(cfg, inp_dir.name)  # checkpoints and metrics written, as the network cloud does
    inp_rounds = []
    for _ in range(rounds):
        t = time.perf_counter()
        engine.run_round()
        inp_rounds.append(time.perf_counter() - t)
    engine.cloud.flush()
    inp_dir.cleanup()
    n_med, i_med = statistics.median(net_rounds[1:]), statistics.median(inp_rounds[1:])
    ratio = n_med / i_med
    return {
        "rounds": rounds,
        "broker": "mosquitto" if broker is not None else "embedded amqtt",
        "network_round_s": [round(v, 4) for v in net_rounds],
        "inprocess_round_s": [round(v, 4) for v in inp_rounds],
        "network_total_s": round(net_total, 2),
        "median_round_s": {"network": round(n_med, 4), "inprocess": round(i_med, 4)},
        "ratio": round(ratio, 3),
        "target": "network round <= 1.5x in-process round (median of rounds 2..N)",
        "pass": ratio <= 1.5,
        "summary": f"[{'mosquitto' if broker is not None else 'amqtt'}] networked round {n_med * 1000:.0f} ms vs in-process {i_med * 1000:.0f} ms: {ratio:.2f}x "
                   f"(round 1: {net_rounds[0]:.2f}s vs {inp_rounds[0]:.2f}s; whole networked run {net_total:.1f}s)",
    }


def run(quick: bool = False) -> dict:
    return run_bench(quick)
