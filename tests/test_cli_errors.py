"""Bad input from a user: one line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import socket

from tests.helpers import fogfl, free_port, one_line_error


def test_unknown_config_key():
    line = one_line_error(fogfl("run", "--set", "cloud.colour=blue", "--quiet"))
    assert "unknown config key 'cloud.colour'" in line


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("topology:\n  fogz: 3\n")
    line = one_line_error(fogfl("run", "--config", str(f), "--quiet"))
    assert "topology.fogz" in line


def test_bad_value():
    line = one_line_error(fogfl("run", "--set", "topology.fogs=0", "--quiet"))
    assert "topology.fogs" in line


def test_unreachable_broker():
    port = free_port()  # nothing listens there
    line = one_line_error(fogfl("edge", "--id", "fog-0.edge-0", "--mqtt", f"127.0.0.1:{port}", timeout=60))
    assert f"127.0.0.1:{port}" in line and "broker" in line.lower()


def test_unreachable_broker_for_run():
    port = free_port()
    line = one_line_error(fogfl("run", "--mqtt", f"127.0.0.1:{port}", "--quiet", "--no-attack", timeout=60))
    assert "broker" in line.lower()


def test_port_in_use_broker():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line_error(fogfl("broker", "--port", str(port), timeout=60))
    assert str(port) in line


def test_port_in_use_cloud(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line_error(fogfl("cloud", "--config", "small", "--port", str(port), "--out", str(tmp_path),
                                    "--set", "cloud.warm_start.per_class=0", timeout=120))
    assert str(port) in line


def test_corrupt_onnx_model(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07this is not an onnx model" * 10)
    line = one_line_error(fogfl("edge", "--id", "fog-0.edge-0", "--model", str(bad), timeout=60))
    assert "model.onnx" in line or "ONNX" in line


def test_bad_edge_id():
    line = one_line_error(fogfl("edge", "--id", "fog-9.edge-0", timeout=60))
    assert "fog-9.edge-0" in line


def test_missing_config_file():
    line = one_line_error(fogfl("run", "--config", "/nonexistent/x.yaml"))
    assert "/nonexistent/x.yaml" in line


def test_malformed_study_grid(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nbase: {presets: [small]}\naxes:\n  samplng: [random]\n")
    line = one_line_error(fogfl("study", str(grid), "--out", str(tmp_path / "out"), "--quiet", timeout=60))
    assert "samplng" in line


def test_bad_cpu_list():
    line = one_line_error(fogfl("edge", "--id", "fog-0.edge-0", "--cpus", "two", timeout=60))
    assert "--cpus 'two'" in line


def test_cpu_not_usable():
    line = one_line_error(fogfl("fog", "--id", "fog-0", "--cloud", "127.0.0.1:1", "--cpus", "4096", timeout=60))
    assert "--cpus 4096" in line and "may only use CPUs" in line
