"""Taps on the fog -> cloud update traffic. Both write the same capture files (protos.capture).

- :class:`CaptureRecorder` plugs into the cloud's update-observer hook: an honest-but-curious
  cloud (``fogfl cloud --tap DIR``) records every update with the model it served for it.
- :class:`TapProxy` is a transparent gRPC proxy (``fogfl tap --listen … --upstream … --out …``):
  fogs point at it instead of the cloud and notice nothing; it forwards every chunk unchanged and
  records the model each fog downloaded and the update it uploaded.

The update payload in a capture is exactly the bytes the fog uploaded, so the two taps agree
byte for byte on the same round and fog.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from kernel.rpc import start_server
from kernel.runtime import settle_heap
from protos import fogfl_pb2 as pb
from protos import fogfl_pb2_grpc as pb_grpc
from protos.capture import build_capture, write_capture
from protos.codec import as_stream, assemble_chunks
from protos.errors import WireError

log = logging.getLogger(__name__)


class CaptureRecorder:
    """Update observer for the cloud's hook. ``obs`` has the fields of the cloud's
    UpdateObservation: fog_id, round, model_version, arch_json, served_payload, header,
    update_payload, served_transformed (duck-typed: attacks never import the cloud)."""

    def __init__(self, out_dir: Path | str, source: str = "curious-cloud", only: set[str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.source = source
        self.only = only
        self.paths: list[Path] = []

    def __call__(self, obs: Any) -> None:
        if self.only is not None and obs.fog_id not in self.only:
            return
        msg = build_capture(
            source=self.source, arch_json=obs.arch_json, model_version=obs.model_version,
            served_payload=obs.served_payload, header=obs.header, update_payload=obs.update_payload,
            captured_at=time.time(), note="served-transformed" if obs.served_transformed else "",
        )
        path = write_capture(self.out_dir, msg)
        self.paths.append(path)
        log.info("captured %s round %d -> %s", obs.fog_id, obs.round, path)


def _forward_refusal(exc: grpc.RpcError, context) -> None:
    """End the proxied call as the cloud ended it: status, details and trailing metadata (the
    round a refused request for a next round's model was about)."""
    context.set_trailing_metadata(tuple(exc.trailing_metadata() or ()))
    context.abort(exc.code(), exc.details() or "upstream failed")


class TapProxy(pb_grpc.AggregatorServicer):
    def __init__(self, upstream: str, out_dir: Path | str) -> None:
        self.upstream = upstream
        self.out_dir = Path(out_dir)
        self.channel = grpc.insecure_channel(upstream)
        self.stub = pb_grpc.AggregatorStub(self.channel)
        self._served: dict[tuple[str, int], tuple[pb.ModelHeader, bytes]] = {}
        self._lock = threading.Lock()
        self.paths: list[Path] = []

    def DownloadModel(self, request: pb.ModelRequest, context):  # noqa: N802
        recorded: list[pb.Chunk] = []
        try:
            for chunk in self.stub.DownloadModel(request, timeout=context.time_remaining()):
                recorded.append(chunk)
                yield chunk
        except grpc.RpcError as exc:
            _forward_refusal(exc, context)
        try:
            header, payload = assemble_chunks(recorded, "model_header")
        except WireError as exc:
            log.warning("tap: could not record the model served to %s: %s", request.fog_id, exc)
            return
        with self._lock:
            self._served[(request.fog_id, int(header.round))] = (header, payload)

    def FetchModel(self, request: pb.ModelRequest, context) -> pb.ModelReply:  # noqa: N802
        try:
            reply = self.stub.FetchModel(request, timeout=context.time_remaining())
        except grpc.RpcError as exc:  # e.g. a model too large for one message: the fog streams it
            _forward_refusal(exc, context)
        try:
            header, payload = assemble_chunks(
                as_stream(pb.Chunk(model_header=reply.header), reply.data, reply.trailer), "model_header")
        except WireError as exc:
            log.warning("tap: could not record the model served to %s: %s", request.fog_id, exc)
            return reply
        with self._lock:
            self._served[(request.fog_id, int(header.round))] = (header, payload)
        return reply

    def SubmitUpdate(self, request: pb.UpdateRequest, context) -> pb.UploadAck:  # noqa: N802
        try:
            ack = self.stub.SubmitUpdate(request, timeout=context.time_remaining())
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "upstream failed")
        self._record(as_stream(pb.Chunk(update_header=request.header), request.data, request.trailer))
        return ack

    def UploadUpdate(self, request_iterator, context):  # noqa: N802
        recorded: list[pb.Chunk] = []

        def forward():
            for chunk in request_iterator:
                recorded.append(chunk)
                yield chunk

        try:
            ack = self.stub.UploadUpdate(forward(), timeout=context.time_remaining())
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "upstream failed")
        self._record(recorded)
        return ack

    def _record(self, recorded: list) -> None:
        """Write the capture of an update (with the model recorded for its fog and round)."""
        try:
            header, payload = assemble_chunks(recorded, "update_header")
        except WireError as exc:
            log.warning("tap: upload not recorded: %s", exc)
            return
        with self._lock:
            served = self._served.pop((header.fog_id, int(header.round)), None)
        if served is None:
            log.warning("tap: update of %s round %d without a recorded download; not captured",
                        header.fog_id, header.round)
            return
        mh, mp = served
        msg = build_capture(source="tap", arch_json=mh.arch_json, model_version=mh.version, served_payload=mp,
                            header=header, update_payload=payload, captured_at=time.time())
        path = write_capture(self.out_dir, msg)
        with self._lock:
            self.paths.append(path)
        log.info("tap captured %s round %d -> %s", header.fog_id, header.round, path)


def start_tap(listen: tuple[str, int], upstream: tuple[str, int], out_dir: Path | str) -> tuple[grpc.Server, int, TapProxy]:
    proxy = TapProxy(f"{upstream[0]}:{upstream[1]}", out_dir)
    server, port, _ = start_server(lambda srv: pb_grpc.add_AggregatorServicer_to_server(proxy, srv), *listen,
                                   hint=" (the tap's --listen address)")
    log.info("tap listening on %s:%d, forwarding to %s:%d, captures in %s", listen[0], port, *upstream, out_dir)
    return server, port, proxy


def run_tap(listen: tuple[str, int], upstream: tuple[str, int], out_dir: Path | str,
            stop: threading.Event | None = None) -> None:
    server, _, proxy = start_tap(listen, upstream, out_dir)
    settle_heap()
    stop = stop or threading.Event()
    try:
        stop.wait()
    finally:
        server.stop(grace=1).wait(2)
        proxy.channel.close()
