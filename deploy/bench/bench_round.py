"""A networked round (processes, MQTT, gRPC) vs the same round in-process, small preset.

Both engines are timed the same way: the **round period**, everything one round costs from the
end of the previous one (announcement, acquisition, training, upload, aggregation, evaluation,
metrics written and published). In-process that is the wall time of ``engine.run_round()``;
networked, the time between two rounds' metrics reaching the launcher. The cloud's own
``wall_s`` (announcement to evaluated model, without the metrics write) is reported beside it
for both, and so is the ratio this benchmark printed before (networked ``wall_s`` over in-process
``run_round``), which mixed the two. Round 1 (ONNX sessions, modAL and exporters warming up in
every process) is excluded; medians of rounds 2..N. Target: networked <= 1.5x in-process.

The broker is Mosquitto if installed, configured as ``deploy/mosquitto/fogfl.conf`` recommends
for latency (``set_tcp_nodelay true``), else the embedded amqtt broker."""

from __future__ import annotations

import json
import os
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
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, port


def _ms(values: list[float]) -> list[float]:
    return [round(v * 1000, 1) for v in values]


def run_bench(quick: bool = False, overrides: list[str] | None = None) -> dict:
    rounds = 4 if quick else 8
    cfg = load_config([CONFIG_DIR / "default.yaml", CONFIG_DIR / "small.yaml"], [f"rounds={rounds}", *(overrides or [])],
                      use_env=False)
    load_before = os.getloadavg()
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
    net_wall = [r["wall_s"] for r in net["rounds"]]
    periods = net.get("round_period_s", {})
    net_period = [periods[str(k)] for k in range(2, rounds + 1) if str(k) in periods]
    with tempfile.TemporaryDirectory() as inp_dir:
        engine = InProcessEngine(cfg, inp_dir)  # checkpoints and metrics written, as the network cloud does
        inp_period = []
        for _ in range(rounds):
            t = time.perf_counter()
            engine.run_round()
            inp_period.append(time.perf_counter() - t)
        engine.cloud.flush()
        inp_wall = [m.wall_s for m in engine.cloud.history]
    load_after = os.getloadavg()
    med = {
        "network_period": statistics.median(net_period), "inprocess_period": statistics.median(inp_period[1:]),
        "network_wall": statistics.median(net_wall[1:]), "inprocess_wall": statistics.median(inp_wall[1:]),
    }
    ratio = med["network_period"] / med["inprocess_period"]
    ratio_wall = med["network_wall"] / med["inprocess_wall"]
    ratio_old = med["network_wall"] / med["inprocess_period"]
    broker_name = "mosquitto" if broker is not None else "embedded amqtt"
    return {
        "rounds": rounds,
        "broker": broker_name,
        "load_avg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
        "network_period_ms": _ms(net_period),
        "inprocess_period_ms": _ms(inp_period),
        "network_wall_ms": _ms(net_wall),
        "inprocess_wall_ms": _ms(inp_wall),
        "network_total_s": round(net_total, 2),
        "median_ms": {k: round(v * 1000, 1) for k, v in med.items()},
        "ratio": round(ratio, 3),
        "ratio_cloud_wall": round(ratio_wall, 3),
        "ratio_previous_definition": round(ratio_old, 3),
        "target": "network round period <= 1.5x in-process round period (medians of rounds 2..N)",
        "pass": ratio <= 1.5,
        "summary": f"[{broker_name.split()[-1]}, load {load_before[0]:.1f}] networked round {med['network_period'] * 1000:.0f} ms "
                   f"vs in-process {med['inprocess_period'] * 1000:.0f} ms: {ratio:.2f}x (cloud wall_s "
                   f"{med['network_wall'] * 1000:.0f} vs {med['inprocess_wall'] * 1000:.0f} ms: {ratio_wall:.2f}x; "
                   f"round 1: {net_wall[0]:.2f}s vs {inp_period[0]:.2f}s; whole networked run {net_total:.1f}s)",
    }


def run(quick: bool = False) -> dict:
    return run_bench(quick)
