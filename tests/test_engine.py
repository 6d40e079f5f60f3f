"""The in-process engine drives the same node objects as the network driver: same config and seed
give the same per-round metrics (accuracy, labels used, bytes)."""

from __future__ import annotations

import json

import pytest

from deploy.cli import CONFIG_DIR
from deploy.engine import InProcessEngine, LocalBus
from kernel.config import load_config
from protos.envelope import Publish
from tests.helpers import fogfl


def test_local_bus_retained_and_chained_delivery():
    bus = LocalBus()
    got = []
    bus.publish(Publish("a", b"1", retain=True))
    bus.subscribe("a", lambda p: got.append(("a", p)) or [Publish("b", p + b"!")])
    bus.subscribe("b", lambda p: got.append(("b", p)))
    assert got == [("a", b"1")]  # retained message delivered on subscribe; "b" had no subscriber yet
    bus.publish(Publish("a", b"2"))
    assert got[-2:] == [("a", b"2"), ("b", b"2!")]


def test_demo_config_reaches_090_inprocess():
    """The demo's defaults (digits, 2 fogs x 3 edges, 10 rounds) reach >= 0.90 test accuracy."""
    cfg = load_config([CONFIG_DIR / "default.yaml"], use_env=False)
    engine = InProcessEngine(cfg, None)
    history = engine.run()
    assert len(history) == cfg.rounds
    assert history[-1].accuracy >= 0.90
    assert history[-1].labels_used == cfg.rounds * cfg.num_edges() * cfg.acquisition.budget


@pytest.mark.slow
def test_network_and_inprocess_agree(tmp_path):
    net_out, inp_out = tmp_path / "net", tmp_path / "inp"
    for engine, out in (("network", net_out), ("inprocess", inp_out)):
        proc = fogfl("run", "--config", "small", "--quiet", "--no-attack", "--engine", engine, "--out", str(out),
                     timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((net_out / "metrics.json").read_text())
    b = json.loads((inp_out / "metrics.json").read_text())
    assert a["initial_accuracy"] == pytest.approx(b["initial_accuracy"], abs=1e-6)
    assert len(a["rounds"]) == len(b["rounds"]) == 3
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-6)
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-4)
        for key in ("labels_used", "bytes_up", "bytes_down", "edge_bytes_up", "edge_bytes_down", "updates"):
            assert ra[key] == rb[key], key


@pytest.mark.parametrize("weighting, expect_counts", [("samples", False), ("classes", True)])
def test_label_counts_sent_only_when_the_strategy_asks(weighting, expect_counts):
    """Per-class counts tell an attacker the batch's labels: fogs send them only to a strategy
    that weights by class (Fed2 with class weighting)."""
    cfg = load_config([CONFIG_DIR / "default.yaml", CONFIG_DIR / "small.yaml"],
                      ["rounds=1", "model.arch=fed2", "cloud.strategy=fed2", f"cloud.fed2_weighting={weighting}"],
                      use_env=False)
    seen = []
    engine = InProcessEngine(cfg, None, observers=[seen.append])
    engine.run_round()
    assert len(seen) == 2
    for obs in seen:
        counts = dict(obs.header.label_counts)
        assert bool(counts) == expect_counts
        if expect_counts:
            assert sum(counts.values()) == obs.header.num_samples


def test_the_round_benchmarks_idle_probe_runs_an_edge_step_in_both_modes():
    """deploy.bench.bench_round's idle probe drives a real edge with the fog's EdgeModel (model and
    announcement in one message) in both modes; what it measures is reported, not asserted."""
    from deploy.bench.bench_round import idle_penalty

    cfg = load_config([CONFIG_DIR / "default.yaml", CONFIG_DIR / "small.yaml"], use_env=False)
    got = idle_penalty(cfg, steps=3, idle_s=0.001)
    assert set(got["edge_step_cpu_ms"]) == {"back_to_back", "after_idle"}
    assert all(v > 0 for v in got["edge_step_cpu_ms"].values()) and got["ratio"] > 0
