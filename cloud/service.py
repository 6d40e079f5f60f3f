"""The cloud's network driver: a gRPC Aggregator service (1 MiB chunk streams, XXH3-128 trailer,
standard health service) and the round loop that announces rounds over MQTT."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health

from cloud.node import CloudNode
from kernel.config import RunConfig
from kernel.errors import ConnectError
from kernel.mqtt import MqttLink, wait_until
from kernel.rpc import start_server
from kernel.runtime import settle_heap
from protos import fogfl_pb2 as pb
from protos import fogfl_pb2_grpc as pb_grpc
from protos.codec import (
    CHUNK_SIZE,
    as_stream,
    chunk_frames,
    iter_chunks,
    parse_chunk,
    payload_digest,
    receive_stream,
    serialize_chunk,
)
from protos.control import ROUND_METADATA
from protos.envelope import Publish
from protos.errors import WireError
from protos.topics import Topics

log = logging.getLogger(__name__)
SERVICE_NAME = "fogfl.Aggregator"


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """The Aggregator service of a :class:`CloudNode`.

    :func:`start_grpc_server` registers it with pass-through (de)serializers: the download goes
    out as pre-serialized frames (:meth:`download_frames`) and uploaded data chunks arrive as
    zero-copy views (:func:`parse_chunk`); the bytes on the wire are the same protobuf messages
    as with the generated registration (``add_AggregatorServicer_to_server``), which works too.
    """

    MAX_WAIT_S = 30.0  # the longest a request asking ahead (ModelRequest.wait_ms) is held

    def __init__(self, node: CloudNode, max_waiting: int = 4) -> None:
        self.node = node
        self.rejected = 0
        # requests asking ahead hold a server thread each while they wait: at most this many
        # (CloudService gives its server this many threads beyond the usual 8, so that uploads
        # always find one)
        self.max_waiting = max_waiting
        self._waiting = 0
        self._wait_lock = threading.Lock()
        # requests ahead by outcome: open (served), busy (at the cap), not_selected, timeout, over, gone
        self.ahead = dict.fromkeys(("open", "busy", "not_selected", "timeout", "over", "gone"), 0)

    def _served(self, request: pb.ModelRequest, context) -> tuple[pb.ModelHeader, bytes, str | None]:
        if request.wait_ms:
            header, payload = self._served_ahead(request, context)
        else:
            header, payload = self.node.serve_model(request.fog_id, request.round)
        log.debug("serving v%d (%d bytes) to %s", header.version, len(payload), request.fog_id)
        # the global model is hashed once per version; a payload a serve hook made for this fog
        # (None here) is hashed chunk by chunk as it streams
        return header, payload, self.node.payload_digest(payload)

    @property
    def waiting(self) -> int:
        """Requests for a next round's model held now."""
        return self._waiting

    def _served_ahead(self, request: pb.ModelRequest, context) -> tuple[pb.ModelHeader, bytes]:
        """A request for round ``request.round`` or later, held until it opens (see ModelRequest)."""
        with self._wait_lock:
            if self._waiting >= self.max_waiting:
                self.ahead["busy"] += 1
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self._waiting} requests already wait for the next round: wait for its announcement")
            self._waiting += 1
        try:
            status, rnd, header, payload = self.node.serve_next(
                request.fog_id, int(request.round), min(request.wait_ms / 1000, self.MAX_WAIT_S), context.is_active)
        finally:
            with self._wait_lock:
                self._waiting -= 1
        with self._wait_lock:
            self.ahead[status] += 1
        if status == "open":
            assert header is not None
            return header, payload
        context.set_trailing_metadata(((ROUND_METADATA, str(rnd)),))
        if status == "not_selected":
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.fog_id} is not selected for round {rnd}")
        if status == "over":
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"the run is over (last round {rnd})")
        context.abort(grpc.StatusCode.ABORTED, f"round {request.round} has not opened yet: ask again")
        raise AssertionError("unreachable")  # context.abort raises

    def DownloadModel(self, request: pb.ModelRequest, context):  # noqa: N802 (gRPC naming)
        header, payload, digest = self._served(request, context)
        yield from iter_chunks(pb.Chunk(model_header=header), payload, digest=digest)

    def download_frames(self, request: pb.ModelRequest, context) -> Iterator[bytes]:
        """DownloadModel as serialized ``Chunk`` messages (for the pass-through serializer)."""
        header, payload, digest = self._served(request, context)
        yield from chunk_frames(pb.Chunk(model_header=header), payload, digest=digest)

    def UploadUpdate(self, request_iterator, context):  # noqa: N802
        # the chunks are kept where gRPC put them: checked as they arrive, read by the fold worker
        return self._receive(request_iterator, context)

    def FetchModel(self, request: pb.ModelRequest, context) -> pb.ModelReply:  # noqa: N802
        """DownloadModel in one reply, for a model of at most one chunk."""
        size = self.node.model_bytes
        if size > CHUNK_SIZE:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the model is {size} bytes, more than one {CHUNK_SIZE}-byte message: use DownloadModel")
        header, payload, digest = self._served(request, context)
        return pb.ModelReply(header=header, data=bytes(payload),
                             trailer=pb.Trailer(xxh3_128=digest or payload_digest(payload)))

    def SubmitUpdate(self, request: pb.UpdateRequest, context) -> pb.UploadAck:  # noqa: N802
        """UploadUpdate in one request, checked exactly as the stream it stands for."""
        chunks = as_stream(pb.Chunk(update_header=request.header), request.data, request.trailer)
        return self._receive(chunks, context)

    def _receive(self, chunks, context) -> pb.UploadAck:
        try:
            got = receive_stream(chunks, "update_header", screen=self.node.screen_update, chunked=True)
        except WireError as exc:
            self.rejected += 1
            log.warning("rejected a malformed upload from %s: %s", context.peer(), exc)
            return pb.UploadAck(accepted=False, reason=str(exc))
        # the stream already checked the values for NaN/inf as they arrived
        return self.node.receive_update(got.header, got.payload, nonfinite=got.nonfinite)


def _aggregator_handler(servicer: AggregatorServicer) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "DownloadModel": grpc.unary_stream_rpc_method_handler(
            servicer.download_frames, request_deserializer=pb.ModelRequest.FromString,
            response_serializer=serialize_chunk),
        "UploadUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.UploadUpdate, request_deserializer=parse_chunk,
            response_serializer=pb.UploadAck.SerializeToString),
        "FetchModel": grpc.unary_unary_rpc_method_handler(
            servicer.FetchModel, request_deserializer=pb.ModelRequest.FromString,
            response_serializer=pb.ModelReply.SerializeToString),
        "SubmitUpdate": grpc.unary_unary_rpc_method_handler(
            servicer.SubmitUpdate, request_deserializer=pb.UpdateRequest.FromString,
            response_serializer=pb.UploadAck.SerializeToString),
    })


def start_grpc_server(servicer: pb_grpc.AggregatorServicer, host: str, port: int, workers: int = 8,
                      start: bool = True) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Bind, register the Aggregator and the health service, start (unless ``start=False``: see
    :func:`kernel.rpc.start_server`). Port 0 picks a free port. An :class:`AggregatorServicer`
    gets the zero-copy registration; any other servicer the generated one."""

    def register(server: grpc.Server) -> None:
        if isinstance(servicer, AggregatorServicer):
            server.add_generic_rpc_handlers((_aggregator_handler(servicer),))
        else:
            pb_grpc.add_AggregatorServicer_to_server(servicer, server)

    return start_server(register, host, port, workers=workers, services=(SERVICE_NAME,),
                        hint=" (choose another with --set cloud.port=N)", start=start)


class CloudService:
    """Runs the rounds: announce (MQTT), serve and collect (gRPC), aggregate, publish metrics."""

    def __init__(self, cfg: RunConfig, node: CloudNode, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.node = node
        self.stop = stop or threading.Event()
        self.topics = Topics(cfg.run_id)
        self.online: set[str] = set()
        self.servicer = AggregatorServicer(node, max_waiting=cfg.cloud.ask_ahead)
        self.server: grpc.Server | None = None
        self.port = 0
        self.link: MqttLink | None = None

    def _on_status(self, topic: str, payload: bytes) -> None:
        node_id = Topics.node_of_status(topic)
        if payload == b"online":
            self.online.add(node_id)
        else:
            self.online.discard(node_id)

    def start(self) -> None:
        """Bind the gRPC port (a busy one fails here, before the broker is tried), connect to the
        broker, clear what an earlier run of the same ``run_id`` left retained there (a broker with
        persistence keeps it across restarts), then serve. In that order: a fog waits until the
        service answers before it subscribes, and ``fogfl run`` starts the fogs and edges only
        then, so none of them takes the earlier run's last announcement, edge model or end for
        this run's."""
        # requests held for the next round take a thread each: the uploads keep the usual 8
        self.server, self.port, _ = start_grpc_server(self.servicer, self.cfg.cloud.host, self.cfg.cloud.port,
                                                      workers=8 + self.cfg.cloud.ask_ahead, start=False)
        self.link = MqttLink(self.cfg.mqtt, f"{self.cfg.run_id}-cloud", self.topics.status("cloud"))
        self.link.subscribe(self.topics.status_all, self._on_status)
        try:
            self.link.connect()
        except ConnectError:
            self.server.stop(0)
            raise
        # the run's announcements, its end, its metrics and the models the fogs served their edges
        # (a fresh edge would take an earlier run's for its own, then refuse this run's v0 as older)
        stale = [self.topics.rounds, self.topics.done, self.topics.metrics,
                 *(self.topics.edge_model(fog) for fog in self.cfg.fog_ids())]
        for topic in stale[:-1]:
            self.link.publish(Publish(topic, b"", retain=True), wait=False)
        self.link.publish(Publish(stale[-1], b"", retain=True))  # QoS 1, in order: all are in once this is
        self.server.start()
        log.info("gRPC aggregator listening on %s:%d", self.cfg.cloud.host, self.port)

    def run(self) -> list:
        assert self.link is not None
        fogs = set(self.cfg.fog_ids())
        if self.cfg.cloud.wait_for_fogs_s:
            ok = wait_until(lambda: fogs <= self.online or self.stop.is_set(), self.cfg.cloud.wait_for_fogs_s)
            missing = sorted(fogs - self.online)
            if not ok and missing:
                log.warning("starting without %d fog(s) online: %s", len(missing), ", ".join(missing[:5]))
        for _ in range(self.cfg.rounds):
            if self.stop.is_set():
                break
            self.node.start_round()
            assert self.node.current is not None
            self.link.publish(Publish(self.topics.rounds, self.node.current.announcement_json, retain=True))
            self.node.wait_round(self.stop)
            metrics = self.node.finish_round()
            self.node.write_metrics()
            # QoS 1 either way (paho resends until the broker acknowledges); only the last round's
            # acknowledgement is waited for, before the process may exit: the others would hold
            # the next announcement back by a broker round trip
            self.link.publish(Publish(self.topics.metrics, metrics.to_json(), retain=True), wait=metrics.final)
        self.node.end_run()  # fogs waiting for a next round are answered now
        done = self.node.done_announcement().to_json()
        self.link.publish(Publish(self.topics.rounds, done, retain=True))  # the fogs
        self.link.publish(Publish(self.topics.done, done, retain=True))  # the edges (and anyone)
        return self.node.history

    def close(self) -> None:
        self.node.end_run()
        sv = self.servicer
        log.info("models served to fogs that asked ahead: %d; requests ahead refused: %d (at the cap of %d "
                 "waiting), %d (not selected), %d (timed out)", sv.ahead["open"], sv.ahead["busy"], sv.max_waiting,
                 sv.ahead["not_selected"], sv.ahead["timeout"])
        if self.link is not None:
            self.link.close()
        if self.server is not None:
            self.server.stop(grace=1).wait(2)


def run_cloud(cfg: RunConfig, out_dir: Path | str, stop: threading.Event | None = None,
              observers=None, serve_transform=None) -> CloudNode:
    node = CloudNode(cfg, out_dir=out_dir, observers=observers, serve_transform=serve_transform)
    svc = CloudService(cfg, node, stop)
    settle_heap()  # before it goes online (kernel.runtime: no full-collection stalls mid-run)
    svc.start()
    try:
        svc.run()
    finally:
        node.flush()
        node.write_metrics()
        svc.close()
    return node
