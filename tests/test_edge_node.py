"""EdgeNode: wire bytes in, SampleBatch publishes out, with a real ONNX model exported from torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge.classifier import OnnxClassifier
from edge.node import EdgeNode
from kernel.config import RunConfig
from kernel.data import load_dataset, make_splits
from kernel.errors import ConfigError
from kernel.models import arch_spec, build_model, export_onnx
from protos import fogfl_pb2 as pb
from protos.codec import sha256_hex, tensor_from_pb
from protos.control import AcquisitionConfig, Announcement
from protos.topics import Topics

EDGE = "fog-1.edge-2"
FOG = "fog-1"


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return RunConfig(run_id="edge-test", seed=3)


@pytest.fixture(scope="module")
def data(cfg):
    ds = load_dataset(cfg.data)
    return ds, make_splits(cfg, ds)


def _train(cfg, ds, idx, seed: int, epochs: int) -> bytes:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only contend (100x slower on a busy box)
    try:
        torch.manual_seed(seed)
        model = build_model(arch_spec(cfg.model, ds.shape, ds.num_classes), seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = torch.from_numpy(ds.x[idx]), torch.from_numpy(ds.y[idx])
        for _ in range(epochs):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return export_onnx(model, ds.shape)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def onnx_v1(cfg, data) -> bytes:
    ds, sp = data
    return _train(cfg, ds, sp.warm, seed=0, epochs=60)  # a warm-start model: right often, unsure often


@pytest.fixture(scope="module")
def onnx_v2(cfg, data) -> bytes:
    ds, sp = data
    return _train(cfg, ds, np.concatenate([sp.warm, sp.edges[0]]), seed=1, epochs=60)


def model_msg(onnx: bytes, version: int, sha: str | None = None, ann: bytes = b"") -> bytes:
    return pb.EdgeModel(version=version, round=version, onnx=onnx, sha256=sha if sha is not None else sha256_hex(onnx),
                        arch="mlp", announcement=ann.decode()).SerializeToString()


def announce(cfg, round_: int, version: int = 1, *, strategy: str = "uncertainty", budget: int = 20, subset: int = 0,
             selected=(FOG,), kind: str = "round", run_id: str | None = None) -> bytes:
    return Announcement(run_id=run_id or cfg.run_id, kind=kind, round=round_, model_version=version,
                        selected=list(selected),
                        acquisition=AcquisitionConfig(budget=budget, strategy=strategy, subset=subset)).to_json()


def batch_of(pubs) -> pb.SampleBatch:
    assert len(pubs) == 1
    b = pb.SampleBatch()
    b.ParseFromString(pubs[0].payload)
    return b


def entropy(onnx: bytes, x: np.ndarray) -> np.ndarray:
    p = OnnxClassifier(onnx).predict_proba(x)
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)


def test_round_yields_a_batch_of_its_own_partition(cfg, data, onnx_v1):
    ds, sp = data
    node = EdgeNode(cfg, EDGE)
    own = set(sp.edges[cfg.edge_index(EDGE)].tolist())
    assert node.fog_id == FOG and node.pool_size == len(own)
    assert node.on_model(model_msg(onnx_v1, 1)) == []
    pubs = node.on_announcement(announce(cfg, 1))
    assert pubs[0].topic == Topics(cfg.run_id).samples(FOG) and pubs[0].qos == 1 and not pubs[0].retain
    b = batch_of(pubs)
    ids = np.asarray(b.sample_ids)
    assert len(ids) == 20 == len(set(ids.tolist())) and set(ids.tolist()) <= own
    np.testing.assert_array_equal(b.y, ds.y[ids])
    np.testing.assert_array_equal(tensor_from_pb(b.x), ds.x[ids])
    assert (b.edge_id, b.fog_id, b.round, b.model_version, b.strategy, b.seq) == (EDGE, FOG, 1, 1, "uncertainty", 1)
    assert len(b.scores) == 20 and list(b.scores) == sorted(b.scores, reverse=True)
    assert node.labels_sent == 20 and node.bytes_sent == len(pubs[0].payload) and node.rejected == 0
    assert node.pool_size == len(own) - 20

    b2 = batch_of(node.on_announcement(announce(cfg, 2)))
    assert b2.seq == 2 and not set(b2.sample_ids) & set(b.sample_ids)
    assert node.pool_size == len(own) - 40


def test_the_round_comes_inside_the_model_its_fog_serves(cfg, onnx_v1):
    """How the fog tells its edges of a round: the EdgeModel carries the announcement. One message
    gives the same batch as the announcement followed by the model; a retained re-delivery of it
    does not give a second one."""
    two_messages = EdgeNode(cfg, EDGE, track_delivery=False)
    assert two_messages.on_announcement(announce(cfg, 1, strategy="margin")) == []  # no model yet
    want = batch_of(two_messages.on_model(model_msg(onnx_v1, 1)))

    node = EdgeNode(cfg, EDGE, track_delivery=False)
    relayed = model_msg(onnx_v1, 1, ann=announce(cfg, 1, strategy="margin"))
    got = batch_of(node.on_model(relayed))
    assert got == want and got.round == 1 and got.model_version == 1
    assert node.on_model(relayed) == []  # retained: same model, a round already served
    b2 = batch_of(node.on_model(model_msg(onnx_v1, 1, ann=announce(cfg, 2, strategy="margin"))))
    assert (b2.round, b2.model_version, b2.seq) == (2, 1, 2)  # same model, next round
    assert node.on_model(model_msg(onnx_v1, 1, ann=announce(cfg, 3, selected=["fog-9"]))) == []  # fog not selected
    assert node.rejected == 0 and node.acted_rounds == [1, 2]


@pytest.mark.parametrize("bad", ["garbage", "other run", "unknown strategy"])
def test_a_bad_relayed_announcement_is_rejected_but_the_model_is_taken(cfg, onnx_v1, onnx_v2, bad):
    node = EdgeNode(cfg, EDGE)
    ann = {"garbage": b"{not json", "other run": announce(cfg, 1, run_id="elsewhere"),
           "unknown strategy": announce(cfg, 1, strategy="nope")}[bad]
    assert node.on_model(model_msg(onnx_v1, 1, ann=ann)) == []
    assert node.rejected == 1 and node.model_version == 1 and node.acted_rounds == []
    assert len(batch_of(node.on_model(model_msg(onnx_v2, 2, ann=announce(cfg, 1, version=2)))).y) == 20


def test_an_unusable_model_is_rejected_with_the_round_it_carries(cfg, onnx_v1):
    node = EdgeNode(cfg, EDGE)
    assert node.on_model(model_msg(onnx_v1, 1)) == []
    bad = model_msg(onnx_v1[: len(onnx_v1) // 2], 2, ann=announce(cfg, 1, version=2))  # truncated ONNX
    assert node.on_model(bad) == [] and node.rejected == 1 and node.model_version == 1
    assert node.pending_round is None and node.acted_rounds == []
    assert node.on_model(model_msg(onnx_v1, 1, sha="0" * 64, ann=announce(cfg, 1))) == []  # checksum mismatch
    assert node.rejected == 2 and node.acted_rounds == []


def test_uncertainty_differs_from_random_and_picks_higher_entropy(cfg, data, onnx_v1):
    ds, _ = data
    picks = {}
    for strategy in ("random", "uncertainty", "entropy"):
        node = EdgeNode(cfg, EDGE)
        node.on_model(model_msg(onnx_v1, 1))
        picks[strategy] = np.asarray(batch_of(node.on_announcement(announce(cfg, 1, strategy=strategy))).sample_ids)
    assert set(picks["uncertainty"].tolist()) != set(picks["random"].tolist())
    h = {k: entropy(onnx_v1, ds.x[v]).mean() for k, v in picks.items()}
    assert h["uncertainty"] > h["random"] + 0.1
    assert h["entropy"] >= h["uncertainty"] - 1e-9  # entropy sampling maximises exactly this


def test_same_config_same_batch(cfg, onnx_v1):
    out = []
    for _ in range(2):
        node = EdgeNode(cfg, EDGE)
        node.on_model(model_msg(onnx_v1, 1))
        out.append(node.on_announcement(announce(cfg, 4, strategy="random", subset=50))[0].payload)
    assert out[0] == out[1]
    other = EdgeNode(cfg, "fog-1.edge-1")  # another edge draws from its own rng and pool
    other.on_model(model_msg(onnx_v1, 1))
    assert other.on_announcement(announce(cfg, 4, strategy="random", subset=50))[0].payload != out[0]


def test_round_waits_for_the_announced_model_version(cfg, onnx_v1, onnx_v2):
    node = EdgeNode(cfg, EDGE)
    assert node.on_announcement(announce(cfg, 1, version=1)) == []  # no model yet
    assert node.pending_round == 1
    b = batch_of(node.on_model(model_msg(onnx_v1, 1)))
    assert (b.round, b.model_version) == (1, 1) and node.pending_round is None

    assert node.on_announcement(announce(cfg, 2, version=2)) == []  # v1 is too old for round 2
    assert node.on_model(model_msg(onnx_v1, 1)) == []  # retained re-delivery of v1 changes nothing
    b = batch_of(node.on_model(model_msg(onnx_v2, 2)))
    assert (b.round, b.model_version, b.seq) == (2, 2, 2)


def test_acts_once_per_round_and_only_when_selected(cfg, onnx_v1):
    node = EdgeNode(cfg, EDGE)
    node.on_model(model_msg(onnx_v1, 1))
    assert node.on_announcement(announce(cfg, 1, selected=["fog-0"])) == []
    assert len(node.on_announcement(announce(cfg, 1))) == 1
    for _ in range(3):  # retained re-delivery
        assert node.on_announcement(announce(cfg, 1)) == []
    assert len(node.on_announcement(announce(cfg, 3))) == 1
    assert node.on_announcement(announce(cfg, 2)) == []  # older than what it served
    assert node.labels_sent == 40 and node.acted_rounds == [1, 3]
    assert not node.finished
    assert node.on_announcement(announce(cfg, 3, kind="done", selected=[])) == []
    assert node.finished and node.rejected == 0


def test_exhausted_pool_sends_the_rest_then_empty_batches(cfg, onnx_v1):
    node = EdgeNode(cfg, EDGE)
    node.on_model(model_msg(onnx_v1, 1))
    n = node.pool_size
    b = batch_of(node.on_announcement(announce(cfg, 1, budget=n + 50, strategy="margin")))
    assert len(b.y) == n and node.pool_size == 0
    b = batch_of(node.on_announcement(announce(cfg, 2, budget=10, strategy="ranked-batch")))
    assert len(b.y) == 0 and tuple(tensor_from_pb(b.x).shape) == (0, 1, 8, 8) and b.seq == 2


@pytest.mark.parametrize("bad", ["garbage", "sha-mismatch", "corrupt-onnx", "wrong-shape", "no-onnx"])
def test_bad_model_is_rejected_and_the_old_one_stays(cfg, onnx_v1, bad):
    node = EdgeNode(cfg, EDGE)
    node.on_model(model_msg(onnx_v1, 1))
    if bad == "garbage":
        payload = b"\xff\x00garbage" * 7
    elif bad == "sha-mismatch":
        payload = model_msg(onnx_v1, 2, sha="0" * 64)
    elif bad == "corrupt-onnx":
        broken = onnx_v1[: len(onnx_v1) // 3]
        payload = model_msg(broken, 2)  # its sha256 is right: the ONNX itself is broken
    elif bad == "wrong-shape":
        spec = {"arch": "mlp", "in_shape": [1, 28, 28], "num_classes": 10, "hidden": 8}
        payload = model_msg(export_onnx(build_model(spec, seed=0), (1, 28, 28)), 2)
    else:
        payload = model_msg(b"", 2)
    assert node.on_model(payload) == []
    assert node.rejected == 1 and node.model_version == 1
    b = batch_of(node.on_announcement(announce(cfg, 1)))  # still works with v1
    assert b.model_version == 1 and len(b.y) == 20


@pytest.mark.parametrize("bad", [b"not json", b'{"round": 1}', b"[]", "wrong-run", "bad-strategy", "bad-budget"])
def test_bad_announcement_is_rejected_and_the_node_still_works(cfg, onnx_v1, bad):
    node = EdgeNode(cfg, EDGE)
    node.on_model(model_msg(onnx_v1, 1))
    if bad == "wrong-run":
        bad = announce(cfg, 1, run_id="another-run")
    elif bad == "bad-strategy":
        bad = announce(cfg, 1, strategy="max-entropy")
    elif bad == "bad-budget":
        raw = json.loads(announce(cfg, 1))
        raw["acquisition"]["budget"] = -5
        bad = json.dumps(raw).encode()
    assert node.on_announcement(bad) == []
    assert node.rejected == 1 and node.labels_sent == 0
    assert len(batch_of(node.on_announcement(announce(cfg, 1))).y) == 20


def test_cleared_retained_messages_are_not_rejections(cfg, onnx_v1):
    node = EdgeNode(cfg, EDGE)
    assert node.on_announcement(b"") == [] and node.on_model(b"") == []
    node.on_model(model_msg(onnx_v1, 1))
    assert node.on_model(b"") == [] and node.model_version == 1 and node.rejected == 0


def test_bad_edge_ids_are_config_errors(cfg):
    for bad in ("fog-9.edge-0", "edge-1", "fog-01.edge-2"):
        with pytest.raises(ConfigError):
            EdgeNode(cfg, bad)


def test_state_and_outbox_survive_a_restart(cfg, onnx_v1, tmp_path):
    node = EdgeNode(cfg, EDGE, tmp_path)
    node.on_model(model_msg(onnx_v1, 1))
    p1 = node.on_announcement(announce(cfg, 1))
    p2 = node.on_announcement(announce(cfg, 2))
    assert [e.seq for e in node.outbox.pending()] == [1, 2]
    assert node.delivered(p2[0]) and not node.delivered(p2[0])  # round 2 acknowledged, round 1 not
    sent = set(batch_of(p1).sample_ids) | set(batch_of(p2).sample_ids)

    again = EdgeNode(cfg, EDGE, tmp_path)  # restart
    pending = again.outbox.pending()
    assert [e.seq for e in pending] == [1] and pending[0].msg == p1[0]  # re-sent on reconnect, same bytes
    assert again.acted_rounds == [1, 2] and again.pool_size == node.pool_size
    again.on_model(model_msg(onnx_v1, 1))
    assert again.on_announcement(announce(cfg, 2)) == []  # retained announcement after restart
    b3 = batch_of(again.on_announcement(announce(cfg, 3)))
    assert b3.seq == 3 and not set(b3.sample_ids) & sent

    # the state written at a restart lost: the outbox's journal alone tells what was sent since
    # its last compaction, acknowledged batches included
    (tmp_path / "state.json").unlink()
    third = EdgeNode(cfg, EDGE, tmp_path)
    assert third.acted_rounds == [1, 2, 3] and [e.seq for e in third.outbox.pending()] == [1, 3]
    assert third.pool_size == again.pool_size and third.outbox.next_seq() == 4

    with pytest.raises(ConfigError, match="belongs to"):
        EdgeNode(RunConfig(run_id="other", seed=3), EDGE, tmp_path)


def test_compaction_hands_the_acknowledged_batches_over_to_the_state(cfg, onnx_v1, tmp_path):
    """Acks are cheap appends; once the journal passes its size limit, the next ack writes
    state.json and rewrites the journal with the pending batches only. A restart after that
    knows every round and sample, and the seq continues."""
    node = EdgeNode(cfg, EDGE, tmp_path)
    node.on_model(model_msg(onnx_v1, 1))
    state = tmp_path / "state.json"
    written = state.stat().st_mtime_ns
    batches = [node.on_announcement(announce(cfg, r))[0] for r in (1, 2, 3)]
    assert node.delivered(batches[0]) and node.delivered(batches[1])
    assert state.stat().st_mtime_ns == written  # no state write per batch
    journal = tmp_path / "outbox" / "outbox.journal"
    before = journal.stat().st_size
    node.outbox.compact_bytes = before - 1
    b4 = node.on_announcement(announce(cfg, 4))[0]
    assert node.delivered(b4)  # past the limit: compacted
    assert journal.stat().st_size < before and [e.seq for e in node.outbox.recorded()] == [3]
    assert json.loads(state.read_text())["acted_rounds"] == [1, 2, 3, 4]

    again = EdgeNode(cfg, EDGE, tmp_path)
    assert again.acted_rounds == [1, 2, 3, 4] and again.pool_size == node.pool_size
    assert [e.msg for e in again.outbox.pending()] == [batches[2]]
    assert again.outbox.next_seq() == 5


def test_without_delivery_tracking_nothing_waits_in_the_outbox(cfg, onnx_v1, tmp_path):
    node = EdgeNode(cfg, EDGE, track_delivery=False)
    node.on_model(model_msg(onnx_v1, 1))
    assert batch_of(node.on_announcement(announce(cfg, 1))).seq == 1
    assert batch_of(node.on_announcement(announce(cfg, 2))).seq == 2
    assert len(node.outbox) == 0 and not node.outbox.durable
    # with a state dir the seq still survives a restart (it is in the node's state)
    node = EdgeNode(cfg, EDGE, tmp_path, track_delivery=False)
    node.on_model(model_msg(onnx_v1, 1))
    node.on_announcement(announce(cfg, 1))
    again = EdgeNode(cfg, EDGE, tmp_path, track_delivery=False)
    again.on_model(model_msg(onnx_v1, 1))
    assert batch_of(again.on_announcement(announce(cfg, 2))).seq == 2 and len(again.outbox) == 0


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_the_outbox_journal_records_each_batch_and_its_ack(cfg, onnx_v1, tmp_path, durability):
    node = EdgeNode(cfg, EDGE, tmp_path, durability=durability)
    node.on_model(model_msg(onnx_v1, 1))
    journal = tmp_path / "outbox" / "outbox.journal"
    size0 = journal.stat().st_size
    p1 = node.on_announcement(announce(cfg, 1))
    state = json.loads((tmp_path / "state.json").read_text())
    # between the query and the publish only the journal grows: its put record is the batch's record
    assert state["acted_rounds"] == [] and state["sent_ids"] == []
    assert journal.stat().st_size > size0 + len(p1[0].payload)
    restarted = EdgeNode(cfg, EDGE, tmp_path)  # a crash now: the journal tells what was sent
    assert restarted.acted_rounds == [1] and restarted.pool_size == node.pool_size
    assert [e.msg for e in restarted.outbox.pending()] == p1
    restarted.outbox.close()

    node.outbox.sync()
    size1 = journal.stat().st_size
    assert node.delivered(p1[0])
    assert journal.stat().st_size - size1 < 32  # an ack is a few bytes appended
    again = EdgeNode(cfg, EDGE, tmp_path)
    assert again.acted_rounds == [1] and again.pool_size == node.pool_size and again.outbox.next_seq() == 2
    assert again.outbox.pending() == [] and [e.msg for e in again.outbox.recorded()] == p1
    assert not node.delivered(p1[0]) and not node.delivered(99)
