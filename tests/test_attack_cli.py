"""`fogfl attack CAPTURE --method NAME`: PNG grid and JSON scores; bad captures and names are
one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploy.cases import make_capture
from kernel.config import DataConfig
from kernel.data import load_dataset
from protos.capture import write_capture, write_truth
from tests.helpers import fogfl, one_line_error


@pytest.fixture(scope="module")
def capture_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("caps")
    ds = load_dataset(DataConfig())
    spec = {"arch": "mlp", "in_shape": [1, 8, 8], "num_classes": 10, "hidden": 32}
    cap = make_capture(spec, ds.x[5:6], ds.y[5:6], round_=3, fog_id="fog-1")
    path = write_capture(d, cap.message)
    write_truth(d, 3, "fog-1", ds.x[5:6], ds.y[5:6])
    return path


def test_attack_writes_grid_and_scores(capture_file, tmp_path):
    proc = fogfl("attack", str(capture_file), "--method", "analytic", "--out", str(tmp_path), "--quiet", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recovered 1/1" in proc.stdout
    png = tmp_path / "r0003-fog-1.analytic.png"
    assert png.stat().st_size > 1000
    scores = json.loads((tmp_path / "r0003-fog-1.analytic.json").read_text())
    s = scores.get("scores", scores)
    assert s["psnr_mean"] >= 60 and s["label_acc"] == 1.0


def test_truncated_capture_via_cli(capture_file, tmp_path):
    bad = tmp_path / "bad.fcap"
    bad.write_bytes(capture_file.read_bytes()[:100])
    line = one_line_error(fogfl("attack", str(bad), "--method", "analytic", timeout=120))
    assert "truncated" in line


def test_corrupt_capture_via_cli(capture_file, tmp_path):
    data = bytearray(capture_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flip.fcap"
    bad.write_bytes(bytes(data))
    line = one_line_error(fogfl("attack", str(bad), "--method", "analytic", timeout=120))
    assert "corrupt" in line


def test_unknown_method(capture_file):
    line = one_line_error(fogfl("attack", str(capture_file), "--method", "telepathy", timeout=120))
    assert "telepathy" in line and "idlg" in line


def test_not_a_capture(tmp_path):
    f = tmp_path / "x.fcap"
    f.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    line = one_line_error(fogfl("attack", str(f), "--method", "analytic", timeout=120))
    assert "not a fogfl capture" in line
