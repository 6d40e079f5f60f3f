"""End-to-end: a real federation of processes (broker, cloud, fogs, edges) over MQTT and gRPC."""

from __future__ import annotations

import json
import re

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


def _served_ahead(out) -> int:
    """How many models the cloud served to fogs that asked for the next round ahead (its log)."""
    found = re.search(r"models served to fogs that asked ahead: (\d+)", (out / "logs" / "cloud.log").read_text())
    assert found, "the cloud did not log its requests ahead"
    return int(found.group(1))


def test_federation_over_embedded_broker(tmp_path):
    """With the cloud holding no request ahead, the fogs learn of every round from MQTT."""
    out = tmp_path / "run"
    proc = fogfl("run", *SMALL, "--out", str(out), "--no-attack", "--set", "cloud.ask_ahead=0", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _check_run(out, 3)
    assert m["engine"] == "network"
    assert "broker" in {p.stem for p in (out / "logs").glob("*.log")}
    assert _served_ahead(out) == 0


def test_federation_over_mosquitto_twice_the_second_time_across_a_wan(tmp_path):
    """The second run has the same run_id on the same broker, which still holds the first run's
    retained end, announcements and edge models: they must not end or stall it. It runs with the
    sites behind an emulated WAN (``--wan-rtt``)."""
    broker = Mosquitto(tmp_path)
    try:
        out = tmp_path / "run"
        proc = fogfl("run", *SMALL, "--out", str(out), "--no-attack", "--mqtt", f"127.0.0.1:{broker.port}",
                     timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _check_run(out, 3)
        assert "broker" not in {p.stem for p in (out / "logs").glob("*.log")}
        # the fogs asked for each next round's model as they sent their update
        assert _served_ahead(out) >= 2

        again = tmp_path / "again"
        proc = fogfl("run", *SMALL, "--out", str(again), "--no-attack", "--mqtt", f"127.0.0.1:{broker.port}",
                     "--wan-rtt", "20", timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = _check_run(again, 3)
        assert m["wan_rtt_ms"] == 20.0
        # the sites reached the broker through the WAN's forwarder, the cloud directly
        sites = (again / "config-sites.yaml").read_text()
        assert f"port: {broker.port}" in (again / "config.yaml").read_text()
        assert f"port: {broker.port}" not in sites
        assert _served_ahead(again) >= 2
    finally:
        broker.stop()


def test_partial_participation_with_fogs_asking_ahead(tmp_path):
    """Half the fogs per round: the selected ones get the model they asked for ahead, the others
    are told they sit the round out and ask for the next."""
    broker = Mosquitto(tmp_path)
    try:
        out = tmp_path / "run"
        proc = fogfl("run", "--config", "small", "--quiet", "--no-attack", "--out", str(out), "--mqtt",
                     f"127.0.0.1:{broker.port}", "--set", "topology.fogs=4", "--set", "topology.edges_per_fog=1",
                     "--set", "topology.fraction=0.5", "--set", "rounds=4", timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        broker.stop()
    m = json.loads((out / "metrics.json").read_text())
    assert [r["updates"] for r in m["rounds"]] == [2, 2, 2, 2]
    assert m["placement"]["cpus"] == {}  # the fogs taking part change every round: nothing pinned
    log = (out / "logs" / "cloud.log").read_text()
    assert _served_ahead(out) >= 4
    left_out = re.search(r"(\d+) \(not selected\)", log)
    assert left_out and int(left_out.group(1)) >= 2
