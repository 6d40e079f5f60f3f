"""run_edge over a real MQTT broker (the embedded amqtt broker of deploy/broker.py on a free
loopback port): retained model carrying its round's announcement in, SampleBatch out, the run's
end from the done topic, outbox replay after a restart, liveness, and a one-line ConnectError
when there is no broker."""

from __future__ import annotations

import json
import queue
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import torch

from deploy.broker import EmbeddedBroker, free_port
from edge.node import EdgeNode
from edge.outbox import read_outbox
from edge.service import run_edge
from kernel.config import RunConfig
from kernel.errors import ConnectError
from kernel.models import build_model, export_onnx
from protos import fogfl_pb2 as pb
from protos.codec import sha256_hex
from protos.control import AcquisitionConfig, Announcement
from protos.topics import Topics

EDGE, FOG = "fog-0.edge-1", "fog-0"


@pytest.fixture(scope="module")
def broker():
    b = EmbeddedBroker().start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def onnx() -> bytes:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = {"arch": "mlp", "in_shape": [1, 8, 8], "num_classes": 10, "hidden": 16}
        return export_onnx(build_model(spec, seed=0), (1, 8, 8))
    finally:
        torch.set_num_threads(threads)


def make_cfg(run_id: str, port: int) -> RunConfig:
    return RunConfig(run_id=run_id, mqtt={"host": "127.0.0.1", "port": port, "keepalive": 5})


class Peer:
    """The test's side of the broker: a paho client standing in for the fog and the cloud."""

    def __init__(self, port: int, subscriptions: list[str]) -> None:
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"peer-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv311)
        ready = threading.Event()

        def on_connect(client, userdata, flags, rc, props):
            for t in subscriptions:
                client.subscribe(t, qos=1)
            ready.set()

        self.client.on_connect = on_connect
        self.client.on_message = lambda c, u, m: self.got.put((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)
        time.sleep(0.2)  # let the SUBACKs land

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def next(self, topic: str, timeout: float = 20.0) -> bytes:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                t, p = self.got.get(timeout=0.1)
            except queue.Empty:
                continue
            if t == topic:
                return p
        raise AssertionError(f"nothing on {topic} within {timeout}s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def announcement(run_id: str, round_: int, kind: str = "round") -> bytes:
    return Announcement(run_id=run_id, kind=kind, round=round_, model_version=0, selected=[FOG],
                        acquisition=AcquisitionConfig(budget=12, strategy="entropy", subset=100)).to_json()


def model_for(onnx: bytes, ann: bytes = b"", version: int = 0) -> bytes:
    """The EdgeModel a fog publishes for a round: the model and, inside it, the announcement."""
    return pb.EdgeModel(version=version, onnx=onnx, sha256=sha256_hex(onnx), arch="mlp",
                        announcement=ann.decode()).SerializeToString()


def start_edge(cfg: RunConfig, state_dir=None, stop=None):
    result: dict = {}

    def target():
        try:
            result["node"] = run_edge(cfg, EDGE, state_dir=state_dir, stop=stop, drain_s=5.0)
        except BaseException as exc:  # surfaced by the test
            result["error"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, result


def batch(payload: bytes) -> pb.SampleBatch:
    b = pb.SampleBatch()
    b.ParseFromString(payload)
    return b


def test_round_trip_over_mqtt(broker, onnx):
    cfg = make_cfg("svc-rt", broker.port)
    cfg.edge.threads = 2  # the edge's queries on two onnxruntime threads
    topics = Topics(cfg.run_id)
    peer = Peer(broker.port, [topics.samples(FOG), topics.status(EDGE)])
    try:
        # retained, as the fog publishes it: the edge finds the model and its round when it subscribes
        peer.publish(topics.edge_model(FOG), model_for(onnx, announcement(cfg.run_id, 1)))
        th, result = start_edge(cfg)
        assert peer.next(topics.status(EDGE)) == b"online"
        b1 = batch(peer.next(topics.samples(FOG)))
        assert (b1.edge_id, b1.fog_id, b1.round, b1.seq, b1.strategy, len(b1.y)) == (EDGE, FOG, 1, 1, "entropy", 12)

        peer.publish(topics.edge_model(FOG), b"garbage from the network")  # rejected, edge stays up
        # the cloud's rounds topic is the fogs' business: had the edge acted on round 3 there, it
        # would have sent round 3's batch first and then ignored round 2 as older
        peer.publish(topics.rounds, announcement(cfg.run_id, 3))
        peer.publish(topics.edge_model(FOG), model_for(onnx, announcement(cfg.run_id, 2)))
        b2 = batch(peer.next(topics.samples(FOG)))
        assert (b2.round, b2.seq) == (2, 2) and not set(b2.sample_ids) & set(b1.sample_ids)

        peer.publish(topics.done, announcement(cfg.run_id, 2, kind="done"))
        th.join(20)
        assert not th.is_alive() and "error" not in result
        node = result["node"]
        assert node.finished and node.labels_sent == 24 and node.rejected == 1 and len(node.outbox) == 0
        assert node.threads == cfg.edge.threads == 2
        assert peer.next(topics.status(EDGE)) == b"offline"
    finally:
        for t in (topics.rounds, topics.done, topics.edge_model(FOG)):  # clear retained messages
            peer.publish(t, b"", retain=True)
        peer.close()


def test_pending_batches_are_resent_after_a_restart(broker, onnx, tmp_path):
    cfg = make_cfg("svc-replay", broker.port)
    topics = Topics(cfg.run_id)
    # an earlier life of the edge made a batch but died before the broker acknowledged it
    crashed = EdgeNode(cfg, EDGE, tmp_path)
    crashed.on_model(pb.EdgeModel(version=0, onnx=onnx, sha256=sha256_hex(onnx)).SerializeToString())
    (lost,) = crashed.on_announcement(announcement(cfg.run_id, 1))
    crashed.outbox.close()
    assert [e.msg for e in read_outbox(tmp_path / "outbox")[0]] == [lost]

    peer = Peer(broker.port, [topics.samples(FOG)])
    stop = threading.Event()
    try:
        th, result = start_edge(cfg, state_dir=tmp_path, stop=stop)
        got = peer.next(topics.samples(FOG))
        assert got == lost.payload and batch(got).seq == 1
        deadline = time.monotonic() + 10
        while read_outbox(tmp_path / "outbox")[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_outbox(tmp_path / "outbox")[0] == []  # acknowledged -> no longer pending on disk
        stop.set()
        th.join(20)
        assert not th.is_alive() and "error" not in result
        assert not result["node"].finished and result["node"].acted_rounds == [1]
    finally:
        stop.set()
        peer.close()


def test_unreachable_broker_is_a_one_line_connect_error():
    cfg = make_cfg("svc-down", free_port())
    with pytest.raises(ConnectError) as err:
        run_edge(cfg, EDGE, connect_timeout=5)
    assert "\n" not in str(err.value) and f"127.0.0.1:{cfg.mqtt.port}" in str(err.value)


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_durable_batches_leave_the_outbox_on_the_brokers_ack(broker, onnx, tmp_path, durability):
    cfg = make_cfg(f"svc-dur-{durability}", broker.port)
    cfg.edge.durability = durability
    topics = Topics(cfg.run_id)
    peer = Peer(broker.port, [topics.samples(FOG)])
    stop = threading.Event()
    try:
        peer.publish(topics.edge_model(FOG), model_for(onnx))  # a model outside a round: no batch
        th, result = start_edge(cfg, state_dir=tmp_path, stop=stop)
        sent = []
        for r in (1, 2):
            peer.publish(topics.edge_model(FOG), model_for(onnx, announcement(cfg.run_id, r)))
            sent.append(batch(peer.next(topics.samples(FOG))))
        assert [(b.round, b.seq) for b in sent] == [(1, 1), (2, 2)]
        deadline = time.monotonic() + 10  # the PUBACK wakes the edge, which appends an ack record
        while time.monotonic() < deadline and read_outbox(tmp_path / "outbox")[0]:
            time.sleep(0.02)
        pending, recorded = read_outbox(tmp_path / "outbox")
        assert pending == [] and [batch(e.msg.payload) for e in recorded] == sent
        stop.set()
        th.join(20)
        assert not th.is_alive() and "error" not in result
        node = result["node"]
        assert node.outbox.durability == durability and node.outbox.unsynced == 0 and len(node.outbox) == 0
        again = EdgeNode(cfg, EDGE, tmp_path)  # what a restart knows: both rounds, every sample, the seq
        assert again.acted_rounds == [1, 2] and again.outbox.next == 3 and again.pool_size == node.pool_size
        state = json.loads((tmp_path / "state.json").read_text())  # written by that restart
        assert sorted(state["sent_ids"]) == sorted(i for b in sent for i in b.sample_ids)
    finally:
        stop.set()
        peer.publish(topics.edge_model(FOG), b"", retain=True)
        peer.close()


def test_a_fresh_fog_clears_an_earlier_runs_model_before_its_edges_act_on_it(broker, onnx, tmp_path):
    """A retained EdgeModel left by an earlier run carries that run's round: a fog starting
    without a pool to resume clears it as it comes online (the peer, subscribed before, sees the
    stale model and then the clearing empty payload)."""
    from cloud.node import CloudNode
    from cloud.service import AggregatorServicer, start_grpc_server
    from fog.node import FogNode
    from fog.service import FogService

    cfg = make_cfg("svc-stale", broker.port)
    cfg.topology.fogs, cfg.topology.edges_per_fog = 1, 1
    topics = Topics(cfg.run_id)
    stale = model_for(onnx, announcement(cfg.run_id, 7))
    peer = Peer(broker.port, [])
    peer.publish(topics.edge_model(FOG), stale)  # retained, as the earlier run's fog left it
    peer.close()
    peer = Peer(broker.port, [topics.edge_model(FOG), topics.status(FOG)])
    server, port, _ = start_grpc_server(AggregatorServicer(CloudNode(cfg)), "127.0.0.1", 0)
    stop = threading.Event()
    svc = FogService(cfg, FogNode(cfg, FOG, state_dir=tmp_path / "fog"), f"127.0.0.1:{port}", stop)
    th = threading.Thread(target=svc.run, daemon=True)
    try:
        assert peer.next(topics.edge_model(FOG)) == stale
        th.start()
        assert peer.next(topics.edge_model(FOG)) == b""
    finally:
        stop.set()
        th.join(10)
        svc.close()
        server.stop(0)
        peer.publish(topics.edge_model(FOG), b"", retain=True)
        peer.close()
    assert not th.is_alive()
