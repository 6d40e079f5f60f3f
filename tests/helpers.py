"""Shared test helpers: run the CLI in a subprocess, start a real Mosquitto on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fogfl(*args: str, timeout: float = 300, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd or ROOT)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert the CLI failed with exactly one line on stderr and no traceback; return the line."""
    assert proc.returncode != 0, f"expected failure, got exit 0\nstdout: {proc.stdout}"
    err_lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in err_lines if ln.startswith("fogfl: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


class Mosquitto:
    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if binary is None:
            if os.environ.get("FOGFL_REQUIRE_MOSQUITTO") or os.environ.get("CI"):
                pytest.fail("mosquitto is not installed (CI installs it in .ci/run: apt-get install mosquitto)")
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
        self.port = free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
