"""The wire contract: generated stubs are fresh, MQTT topics come from protos.topics only, and the
JSON control messages validate strictly."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from protos.control import AcquisitionConfig, Announcement, RoundMetrics, TrainConfig
from protos.errors import WireError
from protos.topics import Topics, check_id

REPO = Path(__file__).resolve().parents[1]
STUBS = ("fogfl_pb2.py", "fogfl_pb2.pyi", "fogfl_pb2_grpc.py")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"error message must be one non-empty line: {msg!r}"
    return msg


# --------------------------------------------------------------------------- generated stubs


def test_generated_stubs_match_the_proto(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "protos/fogfl.proto"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"protoc failed: {proc.stderr.strip()}"
    stale = [name for name in STUBS
             if (tmp_path / "protos" / name).read_bytes() != (REPO / "protos" / name).read_bytes()]
    assert not stale, f"protos/{', protos/'.join(stale)} out of date with protos/fogfl.proto: run make protos"


# --------------------------------------------------------------------------- topics


def test_topic_names():
    t = Topics("run-1")
    assert t.root == "fogfl/run-1"
    assert t.rounds == "fogfl/run-1/rounds"
    assert t.done == "fogfl/run-1/done"
    assert t.metrics == "fogfl/run-1/metrics"
    assert t.samples("fog-0") == "fogfl/run-1/fog/fog-0/samples"
    assert t.edge_model("fog-0") == "fogfl/run-1/fog/fog-0/model"
    assert t.status("fog-0.edge-2") == "fogfl/run-1/status/fog-0.edge-2"
    assert t.status_all == "fogfl/run-1/status/+"


def test_status_wildcard_matches_every_node_of_its_run_only():
    a, b = Topics("a"), Topics("b")
    for node in ("cloud", "fog-3", "fog-3.edge-9"):
        assert topic_matches_sub(a.status_all, a.status(node))
        assert not topic_matches_sub(a.status_all, b.status(node))
        assert Topics.node_of_status(a.status(node)) == node
    assert not topic_matches_sub(a.status_all, a.samples("fog-1"))
    assert not topic_matches_sub(a.status_all, a.rounds)


def test_topics_of_a_run_are_distinct():
    t = Topics("r")
    fogs = [f"fog-{i}" for i in range(3)]
    names = [t.rounds, t.done, t.metrics, *(t.samples(f) for f in fogs), *(t.edge_model(f) for f in fogs),
             *(t.status(f) for f in fogs)]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a+b", "#", "fog 1", "x" * 65, "fog-1\n", "fög", "a\tb", "fog-1/"],
)
def test_invalid_ids_are_rejected(bad):
    for make in (lambda: Topics(bad), lambda: Topics("ok").samples(bad),
                 lambda: Topics("ok").edge_model(bad), lambda: Topics("ok").status(bad)):
        with pytest.raises(ValueError) as e:  # WireError is a ValueError
            make()
        assert isinstance(e.value, WireError)
        _one_line(e)


@pytest.mark.parametrize("good", ["a", "fog-0", "fog-12.edge-3", "run_2024.v1", "x" * 64])
def test_valid_ids_are_accepted(good):
    assert check_id("node", good) == good


_TOPIC_CALLS = {"publish", "subscribe", "unsubscribe", "will_set", "message_callback_add",
                "message_callback_remove"}


def _literal_topic(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _topic_offenders(root: Path) -> list[str]:
    """Modules outside protos/topics.py (and tests) that spell a topic: a 'fogfl/...' literal, or a
    literal topic passed to an MQTT publish/subscribe call."""
    offenders = []
    for path in sorted(root.glob("*/**/*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in {".venv", "tests", "build", "docs"} or rel.parts[0].endswith(".egg-info"):
            continue
        if rel.as_posix() == "protos/topics.py" or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        tree = ast.parse(path.read_text(), filename=str(rel))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("fogfl/"):
                offenders.append(f"{rel}:{node.lineno} literal {node.value!r}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in _TOPIC_CALLS:
                topic = node.args[0] if node.args else next(
                    (k.value for k in node.keywords if k.arg in ("topic", "sub")), None)
                if topic is not None and _literal_topic(topic):
                    offenders.append(f"{rel}:{node.lineno} literal topic in .{node.func.attr}()")
    return offenders


def test_every_topic_comes_from_protos_topics():
    offenders = _topic_offenders(REPO)
    assert not offenders, "topic strings must come from protos.topics: " + "; ".join(offenders)


def test_topic_scan_catches_hand_made_topics(tmp_path):
    (tmp_path / "fog").mkdir()
    (tmp_path / "fog" / "bad.py").write_text(
        'ROOT = "fogfl/demo/rounds"\n'
        "def go(client, fog):\n"
        '    client.publish(f"x/{fog}/samples", b"")\n'
        '    client.subscribe(topic="x/#")\n'
        "    client.publish(TOPICS.rounds, b'')\n"
    )
    found = _topic_offenders(tmp_path)
    assert len(found) == 3, found
    assert all(f.startswith("fog/bad.py:") for f in found)


# --------------------------------------------------------------------------- control messages


def _announcement() -> Announcement:
    return Announcement(
        run_id="run-7", round=3, model_version=5, selected=["fog-0", "fog-2"], deadline_s=12.5,
        min_updates=2, acquisition=AcquisitionConfig(budget=7, strategy="margin", subset=100),
        train=TrainConfig(local_epochs=3, lr=0.01, optimizer="adam", update_kind="gradient", prox_mu=0.1),
        issued_at=1234.5,
    )


def test_announcement_json_roundtrip():
    a = _announcement()
    raw = a.to_json()
    assert isinstance(raw, bytes)
    plain = json.loads(raw)  # readable by any MQTT tool
    assert plain["round"] == 3 and plain["selected"] == ["fog-0", "fog-2"]
    assert plain["train"]["update_kind"] == "gradient"
    assert Announcement.from_json(raw) == a
    assert Announcement.from_json(raw.decode()) == a
    done = Announcement(run_id="r", round=9, model_version=9, kind="done")
    assert Announcement.from_json(done.to_json()).kind == "done"


def test_round_metrics_json_roundtrip():
    m = RoundMetrics(round=1, model_version=2, accuracy=0.9, loss=0.3, labels_used=40, bytes_up=10,
                     bytes_down=20, updates=2, wall_s=1.5, final=True)
    assert RoundMetrics.from_json(m.to_json()) == m


def _mutated(**changes) -> bytes:
    d = json.loads(_announcement().to_json())
    for dotted, value in changes.items():
        node = d
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return json.dumps(d).encode()


@pytest.mark.parametrize(
    "raw, needle",
    [
        (_mutated(bogus=1), "bogus"),  # unknown key
        (_mutated(train__bogus=1), "train.bogus"),  # unknown nested key
        (_mutated(round="three"), "round"),  # wrong type
        (_mutated(selected="fog-0"), "selected"),
        (_mutated(train__optimizer="rmsprop"), "train.optimizer"),
        (_mutated(acquisition__budget=-1), "acquisition.budget"),
        (_mutated(kind="nope"), "kind"),
        (b'{"round": 1, "model_version": 0}', "run_id"),  # missing key
        (b"not json at all", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2, 3]", "Announcement"),  # JSON, but not an object
    ],
)
def test_bad_announcement_raises_wire_error_naming_the_key(raw, needle):
    with pytest.raises(WireError) as e:
        Announcement.from_json(raw)
    msg = _one_line(e)
    assert needle in msg and msg.startswith("Announcement")
