"""A node that receives a bad message rejects it, counts it, and keeps working; nothing that was
accepted is lost."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cloud.node import CloudNode
from fog.node import FogNode
from fog.trainer import local_update
from kernel.config import build_config
from protos import fogfl_pb2 as pb
from protos.codec import decode_tensors, encode_tensors, tensor_to_pb
from protos.control import Announcement


@pytest.fixture(scope="module")
def cfg():
    return build_config([], [("topology.fogs", 2), ("topology.edges_per_fog", 2), ("rounds", 3),
                             ("cloud.warm_start.per_class", 2), ("cloud.warm_start.epochs", 2)], use_env=False)


def _update(node: CloudNode, fog_id: str, **changes):
    _, payload = node.serve_model(fog_id)
    params = decode_tensors(payload)
    res = local_update(node.spec, params, node.ds.x[:8], node.ds.y[:8], node.current.announcement.train)
    upd = changes.pop("update", res.update)
    body = encode_tensors(upd)
    h = pb.UpdateHeader(fog_id=fog_id, round=node.round_no, base_version=node.version, num_samples=8,
                        update_kind="delta", total_bytes=len(body), labels_total=8)
    for k, v in changes.items():
        setattr(h, k, v)
    return h, body, res.update


def test_cloud_rejects_bad_updates_and_keeps_the_round(cfg):
    node = CloudNode(cfg)
    node.start_round()
    h, body, upd = _update(node, "fog-0")
    bad = []
    nan = {k: v.copy() for k, v in upd.items()}
    next(iter(nan.values()))[0] = np.nan
    bad.append(_update(node, "fog-0", update=nan)[:2])
    wrong_shape = dict(upd)
    first = next(iter(wrong_shape))
    wrong_shape[first] = wrong_shape[first][:-1]
    bad.append(_update(node, "fog-0", update=wrong_shape)[:2])
    bad.append(_update(node, "fog-0", round=7)[:2])
    bad.append(_update(node, "fog-0", base_version=5)[:2])
    bad.append(_update(node, "fog-0", update_kind="gradient")[:2])
    bad.append(_update(node, "fog-9")[:2])
    bad.append(_update(node, "fog-0", num_samples=0)[:2])
    bad.append((h, b"\x0a\x05garbage"))
    reasons = []
    for hh, bb in bad:
        ack = node.receive_update(hh, bb)
        assert not ack.accepted
        reasons.append(ack.reason)
    assert all(r and "\n" not in r for r in reasons), reasons
    assert node.rejected_total == len(bad)
    assert node.receive_update(h, body).accepted  # the good one still goes through
    dup = node.receive_update(h, body)
    assert not dup.accepted and "already" in dup.reason
    h1, b1, _ = _update(node, "fog-1")
    assert node.receive_update(h1, b1).accepted
    assert node.round_complete()
    m = node.finish_round()
    assert m.updates == 2 and node.version == 1


def test_fog_rejects_bad_sample_batches_and_keeps_its_pool(cfg, tmp_path):
    fog = FogNode(cfg, "fog-0", state_dir=tmp_path)
    node = CloudNode(cfg)
    ann = node.start_round()
    assert fog.on_announcement(ann.to_json()) is not None
    header, payload = node.serve_model("fog-0")
    fog.on_model(header, payload)
    x = node.ds.x[:3]

    def batch(edge="fog-0.edge-0", seq=1, xs=x, ys=(1, 2, 3), fog_id="fog-0"):
        return pb.SampleBatch(edge_id=edge, fog_id=fog_id, seq=seq, round=1, x=tensor_to_pb("x", xs),
                              y=list(ys)).SerializeToString()

    assert fog.on_samples(batch())
    assert not fog.on_samples(batch())  # duplicate (edge, seq): not pooled twice
    bad = [
        b"\xff\xfe not protobuf",
        batch(edge="fog-1.edge-0"),  # another fog's edge
        batch(fog_id="fog-1", seq=2),  # addressed elsewhere
        batch(seq=3, ys=(1, 2)),  # label count mismatch
        batch(seq=4, ys=(1, 2, 99)),  # label out of range
        batch(seq=5, xs=np.full_like(x, np.nan)),  # NaN
        batch(seq=6, xs=x[:, :, :4, :4]),  # wrong image shape
    ]
    rejected_before = fog.rejected
    for b in bad:
        assert not fog.on_samples(b)
    assert fog.rejected - rejected_before == len(bad)  # every bad one counted
    assert len(fog.pool) == 3
    assert fog.on_samples(batch(edge="fog-0.edge-1", seq=1))
    # accepted samples survive a restart of the fog, which then resumes its broker session too
    assert not fog.pool.resumed  # the first start: a fresh session (an earlier run's batches dropped)
    again = FogNode(cfg, "fog-0", state_dir=tmp_path)
    assert again.pool.resumed and len(again.pool) == 6
    xs, ys = again.pool.arrays()
    assert sorted(ys.tolist()) == [1, 1, 2, 2, 3, 3]


def test_fog_ignores_bad_and_foreign_announcements(cfg):
    fog = FogNode(cfg, "fog-0")
    assert fog.on_announcement(b"") is None
    assert fog.on_announcement(b"{not json") is None
    assert fog.rejected == 1
    other = Announcement(run_id="another-run", round=1, model_version=0, selected=["fog-0"])
    assert fog.on_announcement(other.to_json()) is None
    unselected = Announcement(run_id=cfg.run_id, round=1, model_version=0, selected=["fog-1"])
    assert fog.on_announcement(unselected.to_json()) is None
    mine = Announcement(run_id=cfg.run_id, round=1, model_version=0, selected=["fog-0"])
    assert fog.on_announcement(mine.to_json()) is not None
    assert fog.on_announcement(mine.to_json()) is None  # retained re-delivery: once


def test_strategy_refusals_are_rejections_not_errors(cfg):
    """What the aggregation strategy refuses (here: a masked update in a round of unmasked ones)
    comes back as a rejected upload with the strategy's reason, and the round goes on."""
    node = CloudNode(cfg)
    node.start_round()
    h0, b0, _ = _update(node, "fog-0")
    assert node.receive_update(h0, b0).accepted
    h1, b1, _ = _update(node, "fog-1", defense='{"masking": true}')
    ack = node.receive_update(h1, b1)
    assert not ack.accepted and "masked" in ack.reason
    assert node.rejected_total == 1
    h1, b1, _ = _update(node, "fog-1")
    assert node.receive_update(h1, b1).accepted
    assert node.finish_round().updates == 2 and node.version == 1


def test_finiteness_check_accepts_huge_finite_values_and_refuses_inf(cfg):
    """The fast check sums in float32: a sum that overflows is settled in float64, so finite
    values are never refused for being large."""
    node = CloudNode(cfg)
    node.start_round()
    h, body, upd = _update(node, "fog-0")
    huge = {k: v.copy() for k, v in upd.items()}
    first = next(iter(huge))
    huge[first].reshape(-1)[:4] = np.float32(3e38)  # float32 sum of these: inf
    with np.errstate(over="ignore"):
        assert not np.isfinite(huge[first].sum())
    ack = node.receive_update(h, encode_tensors(huge))
    assert ack.accepted, ack.reason
    inf = {k: v.copy() for k, v in upd.items()}
    inf[first].reshape(-1)[1] = np.inf
    ack = node.receive_update(_update(node, "fog-1")[0], encode_tensors(inf))
    assert not ack.accepted and "NaN or infinity" in ack.reason


def test_updates_acknowledged_before_their_fold_all_reach_the_aggregate(cfg):
    """Uploads from several threads at once: every acknowledged update is folded in (in
    acceptance order, on the fold worker) before finish_round aggregates: the new model is the
    sample-weighted mean of the accepted deltas."""
    from concurrent.futures import ThreadPoolExecutor

    big = build_config([], [("topology.fogs", 8), ("topology.edges_per_fog", 1), ("rounds", 2),
                            ("cloud.warm_start.per_class", 2)], use_env=False)
    node = CloudNode(big)
    node.start_round()
    before = {k: v.copy() for k, v in node.params.items()}
    rng = np.random.default_rng(1)
    sent = {}
    for i in range(8):
        fog = f"fog-{i}"
        delta = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in before.items()}
        body = encode_tensors(delta)
        h = pb.UpdateHeader(fog_id=fog, round=node.round_no, base_version=node.version, num_samples=i + 1,
                            update_kind="delta", total_bytes=len(body), labels_total=i + 1)
        sent[fog] = (h, body, delta)
    with ThreadPoolExecutor(4) as pool:
        acks = list(pool.map(lambda hb: node.receive_update(hb[0], hb[1]), sent.values()))
    assert all(a.accepted for a in acks)
    node.finish_round()
    total = sum(h.num_samples for h, _, _ in sent.values())
    for k in before:
        mean = sum(d[k].astype(np.float64) * h.num_samples for h, _, d in sent.values()) / total
        np.testing.assert_allclose(node.params[k], before[k] + mean, rtol=0, atol=2e-5)
    assert node.metrics_document()["fold_errors"] == 0


def test_a_failed_fold_is_counted_and_logged_and_the_node_goes_on(cfg, caplog):
    node = CloudNode(cfg)
    node.start_round()
    real_fold = node.strategy.fold
    calls = []

    def failing_once(admitted):
        calls.append(admitted.fog_id)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        real_fold(admitted)

    node.strategy.fold = failing_once
    for fog in ("fog-0", "fog-1"):
        h, b, _ = _update(node, fog)
        assert node.receive_update(h, b).accepted
    node.finish_round()
    assert calls == ["fog-0", "fog-1"]
    assert node.metrics_document()["fold_errors"] == 1
    assert any("folding an accepted update failed" in r.getMessage() for r in caplog.records)
    node.strategy.fold = real_fold
    node.start_round()
    for fog in ("fog-0", "fog-1"):
        h, b, _ = _update(node, fog)
        assert node.receive_update(h, b).accepted
    assert node.finish_round().updates == 2 and node.version == 2


def test_a_receiver_beyond_the_fold_backlog_waits_without_blocking_the_node(cfg):
    """While the fold worker is stuck, FOLD_BACKLOG + 1 updates are accepted; the next receiver
    waits for a slot *outside* the node's lock, so models are still served; once the worker moves
    on, the waiting update is accepted and every accepted update reaches the aggregate."""
    import threading

    big = build_config([], [("topology.fogs", 5), ("topology.edges_per_fog", 1), ("rounds", 2),
                            ("cloud.warm_start.per_class", 2)], use_env=False)
    node = CloudNode(big)
    node.start_round()
    gate = threading.Event()
    real_fold = node.strategy.fold

    def slow_fold(admitted):
        assert gate.wait(30)
        real_fold(admitted)

    node.strategy.fold = slow_fold
    uploads = [_update(node, f"fog-{i}") for i in range(5)]
    slots = node.FOLD_BACKLOG + 1
    for h, b, _ in uploads[:slots]:
        assert node.receive_update(h, b).accepted
    acks = {}
    waiting = threading.Thread(target=lambda: acks.setdefault("late", node.receive_update(*uploads[slots][:2])))
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive()  # no fold slot free
    served = {}
    server = threading.Thread(target=lambda: served.setdefault("m", node.serve_model("fog-4")))
    server.start()
    server.join(5)
    stuck = server.is_alive()
    gate.set()  # unblock everything before asserting, so a failure cannot hang the suite
    server.join(30)
    assert not stuck, "serve_model waited for the fold backlog: the receiver held the node's lock"
    assert served["m"][0].total_bytes == len(served["m"][1])
    waiting.join(30)
    assert not waiting.is_alive() and acks["late"].accepted
    h, b, _ = uploads[slots + 1]
    assert node.receive_update(h, b).accepted
    m = node.finish_round()
    assert m.updates == 5 and node.strategy.received == 0  # all folded, round closed
    assert node.metrics_document()["fold_errors"] == 0


def test_a_fog_that_cannot_store_a_batch_leaves_it_unacknowledged_and_stops(cfg, tmp_path):
    """A pool write that fails (disk full, read-only): the batch is not pooled, the fog's MQTT
    handler raises Undelivered (so the link leaves the message unacknowledged for the broker to
    redeliver), and the service stops with a one-line StorageError. A bad batch, by contrast, is
    rejected and acknowledged as before."""
    from fog.service import FogService
    from kernel.errors import StorageError
    from kernel.mqtt import Undelivered

    fog = FogNode(cfg, "fog-0", state_dir=tmp_path / "state")
    node = CloudNode(cfg)
    assert fog.on_announcement(node.start_round().to_json()) is not None
    fog.on_model(*node.serve_model("fog-0"))
    svc = FogService(cfg, fog, "127.0.0.1:1")  # never connected here
    assert svc.link.persistent and svc.link.manual_ack and svc.link.on_undelivered == svc._undelivered
    good = pb.SampleBatch(edge_id="fog-0.edge-0", fog_id="fog-0", seq=1, round=1, x=tensor_to_pb("x", node.ds.x[:3]),
                          y=[1, 2, 3]).SerializeToString()
    svc._on_samples("t", b"\xff not protobuf")  # rejected, returns: acknowledged by the link
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC, as on a full disk
    os.dup2(full, fog.pool.journal._fd)
    os.close(full)
    with pytest.raises(Undelivered, match="pool write failed: No space left"):
        svc._on_samples("t", good)
    assert len(fog.pool) == 0 and not svc.stop.is_set()
    svc.link.on_undelivered("t", "pool write failed: No space left on device")
    assert svc.stop.is_set() and isinstance(svc.fatal, StorageError)
    assert "fog-0 cannot store sample batches" in str(svc.fatal) and "\n" not in str(svc.fatal)
    svc.cloud.close()


def test_a_batch_counts_before_its_sync_and_a_failed_sync_leaves_it_unacknowledged(cfg, tmp_path, monkeypatch):
    """The fog's driver pools a batch (the round's training may start) and only then fdatasyncs
    it, before the acknowledgement. A sync that fails leaves the batch unacknowledged (the fog
    stops, the broker redelivers); the record the journal got is read back by the restarted fog."""
    import kernel.journal
    from fog.service import FogService
    from kernel.mqtt import Undelivered

    cfg = cfg.model_copy(deep=True)
    cfg.topology.edges_per_fog = 1
    fog = FogNode(cfg, "fog-0", state_dir=tmp_path / "state")
    node = CloudNode(cfg)
    assert fog.on_announcement(node.start_round().to_json()) is not None
    fog.on_model(*node.serve_model("fog-0"))
    svc = FogService(cfg, fog, "127.0.0.1:1")  # never connected here

    def batch(seq):
        return pb.SampleBatch(edge_id="fog-0.edge-0", fog_id="fog-0", seq=seq, round=1,
                              x=tensor_to_pb("x", node.ds.x[:3]), y=[1, 2, 3]).SerializeToString()

    seen_at_sync = []
    real = kernel.journal._datasync
    monkeypatch.setattr(kernel.journal, "_datasync",
                        lambda fd: (seen_at_sync.append(fog.acquisition_complete()), real(fd)))
    svc._on_samples("t", batch(1))  # returns: acknowledged
    assert seen_at_sync == [True] and len(fog.pool) == 3  # complete (training may start) before the sync

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(kernel.journal, "_datasync", broken)
    with pytest.raises(Undelivered, match="pool write failed: Input/output error"):
        svc._on_samples("t", batch(2))
    svc.cloud.close()
    fog.pool.close()
    again = FogNode(cfg, "fog-0", state_dir=tmp_path / "state")  # the restarted fog
    assert len(again.pool) == 6 and again.pool.resumed
    again.pool.close()
