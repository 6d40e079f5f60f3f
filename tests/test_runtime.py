"""kernel.runtime: node processes settle their heap before going online; library use does not."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import gc, json, sys
import sklearn.linear_model, onnxruntime  # an edge's imports: many long-lived objects
from kernel import runtime
before = runtime.settle_heap()
if sys.argv[1] == "owned":
    runtime.own_process()
took = runtime.settle_heap()
print(json.dumps({"unowned_took": before, "took": took, "frozen": gc.get_freeze_count(),
                  "tracked_after": len(gc.get_objects())}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout)


def test_an_owned_process_freezes_what_its_imports_left_and_later_collections_skip_it():
    owned, library = _probe("owned"), _probe("library")
    assert owned["unowned_took"] == 0.0 and library["unowned_took"] == 0.0  # nothing before own_process
    assert library["took"] == 0.0 and library["frozen"] == 0  # a library caller's collector untouched
    assert owned["took"] > 0.0
    # the imports' objects are in the permanent generation: a full collection no longer scans them
    assert owned["frozen"] > 50_000
    assert owned["tracked_after"] < owned["frozen"] / 10
    assert library["tracked_after"] > 50_000


def test_settle_heap_in_this_process_is_a_no_op():
    from kernel.runtime import owned, settle_heap

    assert not owned()  # pytest never claims its process
    frozen = gc.get_freeze_count()
    assert settle_heap() == 0.0
    assert gc.get_freeze_count() == frozen


def test_a_cloud_with_checkpoints_traces_its_onnx_template_before_going_online(tmp_path):
    """The first trace (torch.onnx's imports) used to run in the checkpoint thread during rounds
    1-3, holding the GIL while fogs waited on the gRPC server."""
    from cloud.node import CloudNode
    from deploy.cli import CONFIG_DIR
    from kernel import onnx_splice
    from kernel.config import load_config

    cfg = load_config([CONFIG_DIR / "default.yaml", CONFIG_DIR / "small.yaml"], ["rounds=1"], use_env=False)
    with onnx_splice._EXPORTERS_LOCK:
        onnx_splice._EXPORTERS.clear()  # as in a fresh cloud process
    node = CloudNode(cfg, out_dir=tmp_path)
    key = json.dumps(json.loads(node.arch_json), sort_keys=True)
    assert key in onnx_splice._EXPORTERS
