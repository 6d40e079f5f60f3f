"""The design's promise: the edge never loads torch (it must run on a Raspberry Pi without it),
not when imported and not while it works (modAL imports torch whenever it is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from kernel.models import build_model, export_onnx

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_importing_the_edge_leaves_torch_out():
    res = _run("""
        import sys
        import edge, edge.node, edge.service, edge.classifier, edge.strategies, edge.labeler, edge.outbox
        heavy = sorted(m for m in ("torch", "matplotlib", "skimage", "fog", "cloud", "attacks") if m in sys.modules)
        print("LOADED", heavy)
        sys.exit(1 if heavy else 0)
    """)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_working_edge_node_never_loads_torch(tmp_path):
    spec = {"arch": "mlp", "in_shape": [1, 8, 8], "num_classes": 10, "hidden": 16}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (tmp_path / "m.onnx").write_bytes(export_onnx(build_model(spec, seed=0), (1, 8, 8)))
    finally:
        torch.set_num_threads(threads)
    res = _run("""
        import sys
        from pathlib import Path
        from edge.node import EdgeNode
        from kernel.config import RunConfig
        from protos import fogfl_pb2 as pb
        from protos.codec import sha256_hex
        from protos.control import AcquisitionConfig, Announcement

        onnx = Path(sys.argv[1]).read_bytes()
        cfg = RunConfig(run_id="nt")
        node = EdgeNode(cfg, "fog-0.edge-0", sys.argv[2])
        node.on_model(pb.EdgeModel(version=0, onnx=onnx, sha256=sha256_hex(onnx)).SerializeToString())
        sent = 0
        for r, strategy in enumerate(["random", "uncertainty", "margin", "entropy", "ranked-batch"]):
            ann = Announcement(run_id="nt", round=r, model_version=0, selected=["fog-0"],
                               acquisition=AcquisitionConfig(strategy=strategy, budget=5))
            sent += len(node.on_announcement(ann.to_json()))
        print("SENT", sent, "TORCH", "torch" in sys.modules, "MODAL", "modAL.uncertainty" in sys.modules)
        sys.exit(0 if sent == 5 and "torch" not in sys.modules else 1)
    """, str(tmp_path / "m.onnx"), str(tmp_path / "state"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "MODAL True" in res.stdout
