"""The fog's network driver: MQTT for announcements, edge samples and the edge model; gRPC
streams for the model download and the update upload."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc

from fog.node import FogNode
from fog.trainer import preload
from kernel.config import RunConfig
from kernel.errors import ConnectError, StorageError
from kernel.mqtt import MqttLink, Undelivered
from kernel.runtime import settle_heap
from protos import fogfl_pb2 as pb
from protos import fogfl_pb2_grpc as pb_grpc
from protos.codec import (
    CHUNK_SIZE,
    as_stream,
    chunk_frames,
    parse_chunk,
    payload_digest,
    receive_stream,
    serialize_chunk,
)
from protos.control import ROUND_METADATA, Announcement
from protos.envelope import Publish
from protos.errors import WireError
from protos.topics import Topics

log = logging.getLogger(__name__)


class CloudClient:
    """gRPC client of the cloud's Aggregator service (1 MiB chunk streams both ways).

    The streams are called with pass-through (de)serializers: uploaded chunks go out as
    pre-serialized frames (:func:`chunk_frames`) and downloaded data chunks arrive as zero-copy
    views (:func:`parse_chunk`). The messages on the wire are the generated stubs' ``Chunk``s.

    A payload of at most one chunk goes as one message instead (``FetchModel``, ``SubmitUpdate``:
    ~1 ms less CPU per call, both ends, than a stream), checked exactly as a stream. A cloud whose
    model is larger refuses ``FetchModel`` and the client streams from then on; one without these
    methods (UNIMPLEMENTED: an older cloud, a proxy) is streamed to and from."""

    def __init__(self, address: str, timeout: float = 120.0) -> None:
        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.AggregatorStub(self.channel)
        self._download = self.channel.unary_stream(
            "/fogfl.Aggregator/DownloadModel", request_serializer=pb.ModelRequest.SerializeToString,
            response_deserializer=parse_chunk)
        self._upload = self.channel.stream_unary(
            "/fogfl.Aggregator/UploadUpdate", request_serializer=serialize_chunk,
            response_deserializer=pb.UploadAck.FromString)
        self._fetch = self.stub.FetchModel
        self._submit = self.stub.SubmitUpdate
        self.single_message = True  # until the cloud says it has no single-message methods
        self._model_fits: bool | None = None  # learnt from the first download
        self.bytes_down = 0
        self.bytes_up = 0

    def wait_ready(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConnectError(f"cloud at {self.address} did not answer within {timeout:.0f}s") from None

    def download(self, fog_id: str, round_: int, wait_s: float = 0.0) -> tuple[pb.ModelHeader, memoryview]:
        """The model, verified, copied into one reused buffer as it arrives. (Keeping the chunks
        where they arrived, as the cloud does with uploads, was slower here: held until the fog
        decodes them, gRPC's message buffers cannot be reused, and a 51 MB download took ~12 000
        more page faults than the copy into a reused buffer: 0.67-0.72x of a bare stream against
        0.76-0.86x.)

        ``wait_s`` > 0: the model of round ``round_`` or a later one, the cloud holding the request
        up to ``wait_s`` until such a round opens (``ModelRequest.wait_ms``; the header then
        carries the round's announcement). The cloud's refusals (not selected, not open yet, run
        over, too many waiting) come as ``grpc.RpcError``."""
        request = pb.ModelRequest(fog_id=fog_id, round=round_, wait_ms=round(wait_s * 1000))
        timeout = self.timeout + wait_s
        chunks = None
        if self.single_message and self._model_fits is not False:
            try:
                reply = self._fetch(request, timeout=timeout)
                chunks = as_stream(pb.Chunk(model_header=reply.header), reply.data, reply.trailer)
                self._model_fits = True
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self._model_fits = False  # larger than one message: stream it, now and from now on
                elif not self._unsupported(exc):
                    raise
        if chunks is None:
            chunks = self._download(request, timeout=timeout)
        got = receive_stream(chunks, "model_header")
        self.bytes_down += len(got.payload)
        if got.nonfinite:  # found while the bytes arrived; a model like that is refused, not trained
            raise WireError(f"model v{got.header.version} from the cloud holds NaN or infinity in "
                            f"{', '.join(sorted(got.nonfinite))}")
        return got.header, got.payload  # type: ignore[return-value]

    def upload(self, header: pb.UpdateHeader, payload: bytes) -> pb.UploadAck:
        ack = None
        if self.single_message and len(payload) <= CHUNK_SIZE:
            request = pb.UpdateRequest(header=header, data=bytes(payload),
                                       trailer=pb.Trailer(xxh3_128=payload_digest(payload)))
            try:
                ack = self._submit(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                if not self._unsupported(exc):
                    raise
        if ack is None:
            ack = self._upload(chunk_frames(pb.Chunk(update_header=header), payload), timeout=self.timeout)
        self.bytes_up += len(payload)
        return ack

    def _unsupported(self, exc: grpc.RpcError) -> bool:
        """The cloud (or a proxy in between) has no single-message methods: stream from now on."""
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            log.info("%s has no single-message transfers; streaming", self.address)
            self.single_message = False
            return True
        return False

    def close(self) -> None:
        self.channel.close()


class FogService:
    """Takes part in the rounds it is selected for. It learns of a round in one of two ways: as
    it sends its update (or when it starts), it asks the cloud for the next round's model, and the
    cloud answers when that round opens, with its announcement (``ModelRequest.wait_ms``); the
    announcement published on MQTT is the other, for when the cloud cannot hold the request
    (too many fogs waiting, an older cloud) or is unreachable for a moment. Asking ahead saves
    the MQTT hop and the request that followed it: on loopback the fogs had the model 1.3 ms
    after the round opened instead of 2.5-4.3 ms (a small-preset round 21.4 ms instead of 23.4);
    across an emulated WAN, one round trip a round (40 ms: 149-153 ms against 191-195 with
    announcements only; docs/benchmarks.md, sessions 8 and 9)."""

    ASK_AHEAD_S = 2.0  # how long the cloud may hold one request ahead (then the fog asks again)

    def __init__(self, cfg: RunConfig, node: FogNode, cloud_address: str,
                 stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.node = node
        self.stop = stop or threading.Event()
        self.ask_ahead = True  # until the cloud shows it cannot hold a request (older than fogfl 0.5)
        self.taken = 0  # the last round this fog took part in, or learnt it was not selected for
        self._quiet_until = 0  # do not ask ahead again before having taken part in this round
        self.topics = Topics(cfg.run_id)
        self.cloud = CloudClient(cloud_address)
        # the newest announcement not yet looked at (an older one is superseded by it, and one whose
        # model came ahead is skipped): a slot, so that announcements do not pile up while asking ahead
        self.announcements: queue.Queue[Announcement] = queue.Queue(maxsize=1)
        # a kept session: edges' batches published while this fog is away wait at the broker; and
        # a batch is acknowledged only once pooled, so one the fog could not store is sent again
        self.link = MqttLink(cfg.mqtt, f"{cfg.run_id}-{node.fog_id}", self.topics.status(node.fog_id),
                             persistent=True, manual_ack=True)
        self.link.on_undelivered = self._undelivered
        self.fatal: StorageError | None = None
        # the request for the next round's model, sent as the update goes up: (round, its reply);
        # two workers, so that one a fog went past (still held at the cloud) delays no other
        self._ahead: tuple[int, Future] | None = None
        self._asker = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{node.fog_id}-ahead")
        self.link.subscribe(self.topics.rounds, self._on_round)
        self.link.subscribe(self.topics.samples(node.fog_id), self._on_samples)

    def _on_round(self, topic: str, payload: bytes) -> None:
        ann = self.node.on_announcement(payload)
        while ann is not None:
            try:
                self.announcements.put_nowait(ann)
                break
            except queue.Full:  # an older one nobody looked at: superseded
                try:
                    self.announcements.get_nowait()
                except queue.Empty:
                    pass

    def _on_samples(self, topic: str, payload: bytes) -> None:
        """A batch is written to the pool's journal, counted (the last one of a round lets the
        training start), then put on stable storage, and only then acknowledged: the round's
        training does not wait for the last batch's fdatasync (~0.4 ms here, more on an SD card).
        If the sync fails the fog stops unacknowledged, as when the write fails; the restarted fog
        reads the journal and the broker delivers the batch again."""
        try:
            self.node.on_samples(payload, sync=False)
            self.node.pool.sync()
        except OSError as exc:  # the pool could not be written: not acknowledged
            raise Undelivered(f"pool write failed: {exc.strerror or exc}") from None

    def _undelivered(self, topic: str, reason: str) -> None:
        """A batch could not be stored: stop, so that the broker, which keeps this fog's session
        and the unacknowledged batch, delivers it again to the fog once restarted."""
        if self.fatal is None:
            self.fatal = StorageError(f"{self.node.fog_id} cannot store sample batches ({reason}); stopped, the "
                                      f"broker keeps the batch for the restarted fog")
        self.stop.set()

    def run(self) -> None:
        self.cloud.wait_ready(timeout=60)
        # a fog that resumes its pool picks up what the broker kept for it; a fresh one must not
        # take an earlier run's batches for its own
        self.link.connect(fresh_session=not self.node.pool.resumed)
        if not self.node.pool.resumed:
            # an earlier run's model (and the announcement in it) must not set this run's edges off
            self.link.publish(Publish(self.topics.edge_model(self.node.fog_id), b"", retain=True))
        log.info("%s online (cloud %s, %d edges)", self.node.fog_id, self.cloud.address, len(self.node.edges))
        while not self.stop.is_set() and not self.node.finished:
            # only while connected to the broker: a fog that took part in a round while its link
            # was down would serve its edges nothing, and (amqtt) might lose their batches
            if self.ask_ahead and self.link.connected and self.taken >= self._quiet_until and self._next_round():
                continue
            try:
                ann = self.announcements.get(timeout=0.2)
            except queue.Empty:
                continue
            if ann.round != self.node.last_round or ann.round <= self.taken:
                continue  # superseded by a newer one, or its model came ahead
            self._take_part(ann)
        if self.fatal is not None:
            raise self.fatal

    def _next_round(self) -> bool:
        """Ask the cloud for the model of the next round, held until it opens; take part in it.
        False when nothing came of it (the caller then looks at the MQTT announcements)."""
        fog_id = self.node.fog_id
        sent, self._ahead = self._ahead, None
        try:
            if sent is not None and sent[0] == self.taken + 1:
                header, payload = sent[1].result()
            else:  # none sent with the update (or for a round this fog has since gone past)
                header, payload = self.cloud.download(fog_id, self.taken + 1, wait_s=self.ASK_AHEAD_S)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.ABORTED:  # held for ASK_AHEAD_S and no round opened: ask again
                return False
            if code == grpc.StatusCode.NOT_FOUND:  # not selected for the open round
                meta = dict(exc.trailing_metadata() or ())
                if str(meta.get(ROUND_METADATA, "")).isdigit():
                    self.taken = max(self.taken, int(meta[ROUND_METADATA]))
                    return True
            if code == grpc.StatusCode.OUT_OF_RANGE:  # the run is over; the done announcement follows
                self.ask_ahead = False
                return False
            # too many fogs waiting, the cloud away for a moment, ...: rely on the announcement
            # until this fog has taken part in a round again
            log.debug("%s: asking ahead for round %d failed (%s: %s); waiting for the announcement",
                      fog_id, self.taken + 1, code.name, exc.details())
            self._quiet_until = self.taken + 1
            return False
        except WireError as exc:
            log.error("%s: the model for round %d is unusable: %s", fog_id, self.taken + 1, exc)
            self._quiet_until = self.taken + 1
            return False
        if not header.announcement:  # a cloud that ignores wait_ms served the current model at once
            log.info("%s: the cloud cannot hold requests ahead; following its announcements", fog_id)
            self.ask_ahead = False
            return False
        ann = self.node.on_announcement(header.announcement.encode())
        if ann is None:
            known = self.node.announcement
            if known is None or known.round != header.round or self.node.last_round != header.round:
                log.warning("%s: the model served ahead is for round %d, which this fog does not take part in",
                            fog_id, header.round)
                self.taken = max(self.taken, int(header.round))
                return True
            ann = known  # its announcement came over MQTT first
        self._take_part(ann, (header, payload))
        return True

    def _ask_with_upload(self, round_: int) -> None:
        """Send the request for round ``round_``'s model now, beside the update, rather than after
        the update's ack: the cloud holds it until the round opens either way, and across a WAN
        the ack's trip back would hold the next round's model back by one round-trip time
        (``fogfl run --wan-rtt 40``, small preset: a round took a median 149-153 ms against
        186-187 ms asking after the ack; docs/benchmarks.md, session 9). :meth:`_next_round`
        takes the reply."""
        if not (self.ask_ahead and self.link.connected and round_ > self._quiet_until
                and self._ahead is None and not self.stop.is_set()):
            return
        self._ahead = (round_, self._asker.submit(self.cloud.download, self.node.fog_id, round_,
                                                  wait_s=self.ASK_AHEAD_S))

    def _take_part(self, ann: Announcement, fetched: tuple[pb.ModelHeader, memoryview] | None = None) -> None:
        self.taken = max(self.taken, ann.round)
        try:
            self._round(ann, fetched)
        except (grpc.RpcError, WireError, RuntimeError) as exc:
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.error("%s round %d failed: %s", self.node.fog_id, ann.round, detail)

    def _round(self, ann: Announcement, fetched: tuple[pb.ModelHeader, memoryview] | None) -> None:
        header, payload = fetched or self.cloud.download(self.node.fog_id, ann.round)
        for pub in self.node.on_model(header, payload):
            self.link.publish(pub)
        deadline = ann.acquisition.deadline_s
        if not self.node.wait_acquisition(deadline):
            got = len(self.node.delivered.get(ann.round, set()))
            log.warning("%s round %d: %d/%d edges delivered before the %.0fs deadline; training on what arrived",
                        self.node.fog_id, ann.round, got, len(self.node.edges), deadline)
        if self.stop.is_set():
            return
        up_header, up_payload = self.node.train()
        self._ask_with_upload(ann.round + 1)
        ack = self.cloud.upload(up_header, up_payload)
        if ack.accepted:
            log.debug("%s round %d: update accepted (%d bytes)", self.node.fog_id, ann.round, len(up_payload))
        else:
            log.error("%s round %d: update rejected by the cloud: %s", self.node.fog_id, ann.round, ack.reason)

    def close(self) -> None:
        self.link.close()
        self._asker.shutdown(wait=False, cancel_futures=True)
        self.cloud.close()  # a request still held ends with the channel
        self.node.pool.close()


def run_fog(cfg: RunConfig, fog_id: str, cloud_address: str, state_dir: Path | str | None = None,
            truth_dir: Path | str | None = None, stop: threading.Event | None = None) -> FogNode:
    node = FogNode(cfg, fog_id, state_dir=state_dir, truth_dir=truth_dir)
    log.debug("%s: torch's lazy imports took %.2fs", fog_id, preload())  # before it reports online
    settle_heap()  # then the heap (kernel.runtime: no full-collection stalls mid-run)
    svc = FogService(cfg, node, cloud_address, stop)
    try:
        svc.run()
    finally:
        svc.close()
    return node


