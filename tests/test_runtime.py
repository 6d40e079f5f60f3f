"""kernel.runtime: node processes settle their heap before going online (library use does not), and pin themselves to CPUs when told."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


# ------------------------------------------------------------------------------------ CPU pinning

_PIN_PROBE = """
import json, os, sys, threading
from kernel import runtime
runtime.pin_cpus(runtime.parse_cpu_list(sys.argv[1]))
seen = {}
t = threading.Thread(target=lambda: seen.update(thread=sorted(os.sched_getaffinity(0))))
t.start(); t.join()
print(json.dumps({"process": sorted(os.sched_getaffinity(0)), **seen}))
"""


def test_cpu_lists_read_and_written_as_taskset_does():
    from kernel.runtime import format_cpu_list, parse_cpu_list

    assert parse_cpu_list("0") == {0}
    assert parse_cpu_list("0,2") == {0, 2}
    assert parse_cpu_list(" 0-3, 6 ") == {0, 1, 2, 3, 6}
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    for cpus in ({3}, {0, 2, 4}, {1, 2, 3, 9, 10}):
        assert parse_cpu_list(format_cpu_list(cpus)) == cpus


def test_a_bad_cpu_list_is_a_config_error():
    from kernel.errors import ConfigError
    from kernel.runtime import parse_cpu_list

    for bad in ("", "a", "1-", "3-1", "-1", "0,,1", "1.5"):
        with pytest.raises(ConfigError, match="--cpus"):
            parse_cpu_list(bad)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_pinned_process_and_the_threads_it_starts_run_on_those_cpus_only():
    from kernel.runtime import usable_cpus

    cpu = min(usable_cpus())
    out = subprocess.run([sys.executable, "-c", _PIN_PROBE, str(cpu)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    assert json.loads(out.stdout) == {"process": [cpu], "thread": [cpu]}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_pinning_to_a_cpu_this_process_may_not_use_is_refused():
    from kernel.errors import ConfigError
    from kernel.runtime import pin_cpus, usable_cpus

    before = usable_cpus()
    with pytest.raises(ConfigError, match="may only use CPUs"):
        pin_cpus(frozenset({max(before) + 1}))
    assert usable_cpus() == before
