"""End-to-end: a real federation of processes (broker, cloud, fogs, edges) over MQTT and gRPC."""

from __future__ import annotations

import json

import pytest

from kernel.runtime import usable_cpus
from tests.helpers import Mosquitto, fogfl

pytestmark = pytest.mark.slow

SMALL = ["--config", "small", "--quiet"]


def _check_run(out, rounds: int) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["rounds"]) == rounds
    for r in m["rounds"]:
        assert r["updates"] == 2, r  # both fogs reported every round
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    labels = [r["labels_used"] for r in m["rounds"]]
    # 2 fogs x 2 edges x budget 10 labels per round, cumulative
    assert labels == [40 * (i + 1) for i in range(rounds)], labels
    assert m["final_accuracy"] > 0.5
    assert (out / "accuracy.png").stat().st_size > 1000
    logs = {p.stem for p in (out / "logs").glob("*.log")}
    assert {"cloud", "fog-0", "fog-1", "fog-0.edge-0", "fog-1.edge-1"} <= logs
    # each fog and its edges run on their own share of the CPUs; the cloud floats
    placed = m["placement"]["cpus"]
    if len(usable_cpus()) >= 2:
        assert placed["fog-0"] == placed["fog-0.edge-1"] != placed["fog-1"] == placed["fog-1.edge-0"]
        for name in ("fog-0", "fog-1.edge-1"):
            assert f"pinned to CPUs {placed[name]}" in (out / "logs" / f"{name}.log").read_text()
        assert "cloud" not in placed and "pinned" not in (out / "logs" / "cloud.log").read_text()
    else:
        assert placed == {}
    return m


def test_federation_over_embedded_broker(tmp_path):
    out = tmp_path / "run"
    proc = fogfl("run", *SMALL, "--out", str(out), "--no-attack", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _check_run(out, 3)
    assert m["engine"] == "network"
    assert "broker" in {p.stem for p in (out / "logs").glob("*.log")}


def test_federation_over_mosquitto(tmp_path):
    broker = Mosquitto(tmp_path)
    try:
        out = tmp_path / "run"
        proc = fogfl("run", *SMALL, "--out", str(out), "--no-attack", "--mqtt", f"127.0.0.1:{broker.port}",
                     timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _check_run(out, 3)
        assert "broker" not in {p.stem for p in (out / "logs").glob("*.log")}
    finally:
        broker.stop()
