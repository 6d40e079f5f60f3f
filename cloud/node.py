"""The cloud coordinator as transport-free logic.

The network driver (``cloud.service``) and the in-process engine call the same methods with the
same wire bytes:

    ann = node.start_round()                       # -> Announcement (published on MQTT)
    header, payload = node.serve_model(fog_id)      # -> model download stream
    status, rnd, header, payload = node.serve_next(fog_id, round_, wait_s)  # the same, once round_ opens
    ack = node.receive_update(update_header, payload)  # <- update upload stream
    if node.round_complete(): metrics = node.finish_round()

Two plain hooks, and no knowledge of attacks: ``observers`` see every accepted update with the
model served for it; ``serve_transform`` may replace the parameters served to a given fog. An
update computed on a model other than the global one is recorded (observers) but not aggregated,
so the global model stays sound.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cloud.strategies import Admitted, AggregationError, make_strategy
from kernel.config import RunConfig
from kernel.data import Dataset, Splits, load_dataset, make_splits
from kernel.models import arch_spec, build_model, export_onnx, get_params, set_params
from kernel.onnx_splice import exporter_for
from protos import fogfl_pb2 as pb
from protos.codec import (
    ChunkedPayload,
    TensorShape,
    all_finite,
    decode_tensors,
    encode_tensors,
    payload_digest,
)
from protos.control import Announcement, RoundMetrics, TrainConfig
from protos.errors import WireError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateObservation:
    """What a curious observer sees: the exact bytes served and received."""

    fog_id: str
    round: int
    model_version: int
    arch_json: str
    served_payload: bytes
    header: pb.UpdateHeader
    update_payload: bytes
    served_transformed: bool


Observer = Callable[[UpdateObservation], None]
# (fog_id, round, global params, arch spec) -> None (serve the global model), or the parameters to
# serve that fog instead, optionally with that fog's round config: (params, TrainConfig | None).
ServeTransform = Callable[[str, int, dict[str, np.ndarray], dict],
                          "dict[str, np.ndarray] | tuple[dict[str, np.ndarray], TrainConfig | None] | None"]


@dataclass
class _Round:
    number: int
    announcement: Announcement
    started: float
    selected: set[str]
    announcement_json: bytes = b""  # as published on MQTT and handed to fogs that asked ahead
    received: dict[str, pb.UpdateHeader] = field(default_factory=dict)
    served: dict[str, bytes] = field(default_factory=dict)  # fog -> payload actually served
    transformed: set[str] = field(default_factory=set)
    train_override: dict[str, TrainConfig] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: int = 0
    aggregated: int = 0
    folds: list[Future] = field(default_factory=list)  # fold-ins of accepted updates under way
    fold_errors: int = 0


@dataclass
class _Slot:
    """A fold slot taken by a receiver; ``handed_over`` once a queued fold owns it."""

    handed_over: bool = False


def _issued_at() -> float:
    """An announcement's time stamp, in whole seconds: the fogs relay the announcement to their
    edges verbatim, so a stamp whose JSON length varied with the clock (``1764892800.12`` vs
    ``1764892800.123``) would make a round's bytes differ between two runs of the same config."""
    return float(int(time.time()))


class CloudNode:
    FOLD_BACKLOG = 2  # accepted updates that may wait for the fold worker (see receive_update)

    def __init__(
        self,
        cfg: RunConfig,
        *,
        out_dir: Path | str | None = None,
        observers: list[Observer] | None = None,
        serve_transform: ServeTransform | None = None,
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir else None
        self.observers = list(observers or [])
        self.serve_transform = serve_transform
        self.ds: Dataset = load_dataset(cfg.data)
        self.splits: Splits = make_splits(cfg, self.ds)
        self.spec = arch_spec(cfg.model, self.ds.shape, self.ds.num_classes)
        self.spec["dataset"] = cfg.data.dataset  # informational: lets scoring use the dataset-mean prior
        self.arch_json = json.dumps(self.spec)
        self.fog_ids = cfg.fog_ids()
        self.rng = np.random.default_rng([cfg.seed, 0xC10D])
        self.model: nn.Module = build_model(self.spec, seed=cfg.seed)
        self.version = 0
        self.round_no = 0
        self.current: _Round | None = None
        self.history: list[RoundMetrics] = []
        self.labels: dict[str, int] = {}
        self.rejected_total = 0
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)  # notified on every accepted update
        self._opened = threading.Condition(self._lock)  # notified when a round opens and when the run ends
        self.run_over = False
        self._ckpt_pool: ThreadPoolExecutor | None = None
        self._ckpt_futures: list = []
        self._fold_pool: ThreadPoolExecutor | None = None
        self._fold_slots = threading.BoundedSemaphore(self.FOLD_BACKLOG + 1)  # + the one being folded
        self.fold_errors_total = 0
        self._warm_start()
        self.params = get_params(self.model)
        self._payload = encode_tensors(self.params)
        self._payload_digest = payload_digest(self._payload)  # once per version, not per download
        self.strategy = make_strategy(cfg.cloud, cfg.train)
        if self.out_dir is not None:
            # checkpoints export ONNX by splicing weights into a graph traced once per process:
            # trace it now, not in the checkpoint thread, where the first trace (torch.onnx's
            # imports, ~1 s of CPU) held the GIL through rounds 1-3 and stalled the gRPC server
            exporter_for(self.arch_json)
        self.initial_accuracy, self.initial_loss = self.evaluate()
        log.info("cloud ready: %s, %d params, initial accuracy %.3f", self.spec["arch"],
                 sum(v.size for v in self.params.values()), self.initial_accuracy)

    # ---------------------------------------------------------------- model
    def _warm_start(self) -> None:
        ws = self.cfg.cloud.warm_start
        idx = self.splits.warm
        if not len(idx) or not ws.epochs:
            return
        x = torch.from_numpy(self.ds.x[idx])
        y = torch.from_numpy(self.ds.y[idx])
        opt = torch.optim.Adam(self.model.parameters(), lr=ws.lr)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        loss_fn = nn.CrossEntropyLoss()
        self.model.train()
        for _ in range(ws.epochs):
            order = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), ws.batch_size):
                b = order[s : s + ws.batch_size]
                opt.zero_grad()
                loss_fn(self.model(x[b]), y[b]).backward()
                opt.step()
        log.info("warm start on %d labelled samples (%d per class)", len(idx), ws.per_class)

    def evaluate(self) -> tuple[float, float]:
        idx = self.splits.test
        self.model.eval()
        with torch.no_grad():
            logits = self.model(torch.from_numpy(self.ds.x[idx]))
            y = torch.from_numpy(self.ds.y[idx])
            loss = nn.functional.cross_entropy(logits, y).item()
            acc = (logits.argmax(1) == y).float().mean().item()
        return float(acc), float(loss)

    def onnx_bytes(self) -> bytes:
        return export_onnx(self.model, self.ds.shape)

    # ---------------------------------------------------------------- rounds
    def start_round(self) -> Announcement:
        with self._lock:
            self.round_no += 1
            selected = self.strategy.select(self.fog_ids, self.cfg.topology.fraction, self.rng)
            train = self.strategy.configure(self.round_no, self.cfg.train)
            min_updates = self.cfg.cloud.min_updates or len(selected)
            if self.cfg.defense.masking:
                min_updates = len(selected)  # pairwise masks cancel only when every peer reports
            ann = Announcement(
                run_id=self.cfg.run_id, round=self.round_no, model_version=self.version,
                selected=sorted(selected), deadline_s=self.cfg.cloud.round_deadline_s,
                min_updates=min(min_updates, len(selected)), acquisition=self.cfg.acquisition, train=train,
                issued_at=_issued_at(),
            )
            self.current = _Round(self.round_no, ann, time.monotonic(), set(selected), ann.to_json())
            self.strategy.begin_round(self.params, self.spec)
            log.info("round %d: model v%d, %d fogs selected", self.round_no, self.version, len(selected))
            self._opened.notify_all()
            return ann

    def end_run(self) -> None:
        """No round will open any more: fogs waiting for the next one are told so."""
        with self._lock:
            self.run_over = True
            self._opened.notify_all()

    def serve_next(self, fog_id: str, round_: int, wait_s: float,
                   active: Callable[[], bool] = lambda: True) -> tuple[str, int, pb.ModelHeader | None, bytes]:
        """The model of round ``round_`` or a later one for ``fog_id``, waiting up to ``wait_s`` for
        such a round to open (a fog asks as it sends its update, and so learns of the next round
        without waiting for the announcement on MQTT): ``(status, round, header, payload)``, status
        one of ``"open"`` (header and payload as :meth:`serve_model`, the header carrying the
        round's announcement), ``"not_selected"`` (the open round ``round`` does not include this
        fog), ``"timeout"``, ``"over"`` (the run has ended) or ``"gone"`` (``active()`` turned false:
        the asker went away; checked every 0.5 s)."""
        end = time.monotonic() + wait_s
        with self._opened:
            while True:
                if self.run_over:
                    return "over", self.round_no, None, b""
                rnd = self.current
                if rnd is not None and rnd.number >= round_:
                    if fog_id not in rnd.selected:
                        return "not_selected", rnd.number, None, b""
                    header, payload = self.serve_model(fog_id, rnd.number)
                    header.announcement = rnd.announcement_json.decode()
                    return "open", rnd.number, header, payload
                left = end - time.monotonic()
                if left <= 0:
                    return "timeout", self.round_no, None, b""
                if not active():
                    return "gone", self.round_no, None, b""
                self._opened.wait(min(left, 0.5))

    def done_announcement(self) -> Announcement:
        return Announcement(kind="done", run_id=self.cfg.run_id, round=self.round_no,
                            model_version=self.version, issued_at=_issued_at())

    def serve_model(self, fog_id: str, round_: int | None = None) -> tuple[pb.ModelHeader, bytes]:
        """The global model for ``fog_id`` (possibly transformed by the serve hook)."""
        with self._lock:
            payload = self._payload
            rnd = self.current
            train: TrainConfig | None = None
            if self.serve_transform is not None:
                alt = self.serve_transform(fog_id, self.round_no, self.params, self.spec)
                if isinstance(alt, tuple):
                    alt, train = alt
                if alt is not None:
                    payload = encode_tensors(alt)
            if rnd is not None:
                if payload is not self._payload:
                    rnd.transformed.add(fog_id)
                if train is not None:
                    rnd.train_override[fog_id] = train
                rnd.served[fog_id] = payload
                rnd.bytes_down += len(payload)
            header = pb.ModelHeader(version=self.version, round=self.round_no, arch_json=self.arch_json,
                                    total_bytes=len(payload), train_json=train.model_dump_json() if train else "")
            return header, payload

    @property
    def model_bytes(self) -> int:
        """Size of the global model's encoding (what a fog downloads and uploads)."""
        return len(self._payload)

    def payload_digest(self, payload: bytes) -> str | None:
        """The transfer digest (:func:`protos.codec.payload_digest`) of ``payload`` if it is the
        global model's payload (hashed once per version), else None (e.g. a payload transformed
        for one fog)."""
        with self._lock:
            return self._payload_digest if payload is self._payload else None

    def receive_update(self, header: pb.UpdateHeader, payload: bytes | memoryview,
                       nonfinite: frozenset[str] | None = None) -> pb.UploadAck:
        """Check an uploaded update and accept or reject it.

        Accepted means: the header fits the open round, the tensors have the model's names, shapes
        and dtype and hold no NaN or infinity, and the strategy admitted it. The ack goes back then;
        the fold-in of the values into the aggregate (the one pass over the update that is not a
        check) runs on the node's fold worker, in acceptance order, and :meth:`finish_round` waits
        for it. At most :attr:`FOLD_BACKLOG` accepted updates wait for their fold; a receiver
        beyond that waits for a slot before it takes the node's lock (so downloads and other
        fogs' checks go on meanwhile), and memory stays bounded whatever the fan-in.
        ``payload`` is only read (any bytes-like object; the update's arrays are views into it).
        ``nonfinite``: the float tensors a receiver already found holding NaN or infinity while the
        bytes arrived (:func:`protos.codec.receive_stream`); None and the node checks itself.
        """
        self._fold_slots.acquire()
        slot = _Slot()  # the slot passes to the fold if one is queued, else it is released here
        try:
            return self._receive(header, payload, nonfinite, slot)
        finally:
            if not slot.handed_over:
                self._fold_slots.release()

    def _receive(self, header: pb.UpdateHeader, payload: bytes | memoryview,
                 nonfinite: frozenset[str] | None, slot: _Slot) -> pb.UploadAck:
        """receive_update, holding a fold slot; checks under the node's lock, observers after."""
        with self._lock:
            rnd = self.current
            reason = self._check(header, rnd)
            admitted: Admitted | None = None
            shapes: dict[str, TensorShape] | None = None
            if reason is None:
                try:
                    # kept chunks already checked for NaN/inf: names, shapes and dtypes are all the
                    # checks need, and the fold worker reads the values after the ack
                    shapes = payload.shapes() if isinstance(payload, ChunkedPayload) and nonfinite is not None else None
                    # else read-only views, unaligned allowed: only checked and folded, never copied
                    update = shapes if shapes is not None else decode_tensors(payload, copy=False, aligned=False)
                    self._check_shapes(update, nonfinite)
                    if header.fog_id not in rnd.transformed:  # type: ignore[union-attr]
                        meta = {"masked": _masked(header), "label_counts": dict(header.label_counts)}
                        admitted = self.strategy.admit(header.fog_id, update, int(header.num_samples),
                                                       header.update_kind, meta)
                    del update
                except (WireError, AggregationError) as exc:
                    reason = str(exc)
            if reason is not None:
                self.rejected_total += 1
                if rnd is not None:
                    rnd.rejected += 1
                log.warning("rejected update from %s (round %d): %s", header.fog_id, header.round, reason)
                return pb.UploadAck(accepted=False, reason=reason, round=header.round)
            assert rnd is not None
            rnd.received[header.fog_id] = header
            rnd.bytes_up += len(payload)
            self.labels[header.fog_id] = int(header.labels_total)
            transformed = header.fog_id in rnd.transformed
            if admitted is not None:
                self._fold_later(rnd, admitted, slot, payload if shapes is not None else None)
                rnd.aggregated += 1
            served = rnd.served.get(header.fog_id, self._payload)
            if self.observers and isinstance(payload, ChunkedPayload):
                payload = payload.contiguous()  # observers get the bytes in one piece
            obs = UpdateObservation(header.fog_id, header.round, self.version, self.arch_json, served, header,
                                    payload, transformed)
            self._arrived.notify_all()
        for observer in self.observers:
            try:
                observer(obs)
            except Exception:
                log.exception("update observer failed; the round goes on")
        return pb.UploadAck(accepted=True, round=header.round)

    def _fold_later(self, rnd: _Round, admitted: Admitted, slot: _Slot,
                    payload: ChunkedPayload | None = None) -> None:
        """Queue an admitted update for the fold worker (under the node's lock) on the caller's
        fold slot, which the fold releases when it ends. ``payload``: the update was admitted on
        its shapes alone; the fold worker decodes its values from these kept chunks first."""
        if self._fold_pool is None:
            self._fold_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fold")

        def fold() -> None:
            if payload is None:
                self.strategy.fold(admitted)
            else:
                self.strategy.fold(replace(admitted, update=decode_tensors(payload, copy=False, aligned=False)))

        fut = self._fold_pool.submit(fold)
        slot.handed_over = True
        fut.add_done_callback(lambda _f: self._fold_slots.release())
        rnd.folds.append(fut)

    def _wait_folds(self, rnd: _Round) -> None:
        """Block until every accepted update of ``rnd`` is folded in. A fold that failed (a bug:
        everything it could trip on was checked before the ack) is logged and counted."""
        for fut in rnd.folds:
            exc = fut.exception()
            if exc is not None:
                rnd.fold_errors += 1
                log.error("round %d: folding an accepted update failed: %r", rnd.number, exc)
        rnd.folds = []

    def screen_update(self, header: pb.UpdateHeader) -> str | None:
        """Why an upload with this header would be rejected, before its payload is read (None:
        read it). The same header checks :meth:`receive_update` makes; a receiver calls this
        first so that it neither reads nor allocates for an update it would refuse."""
        with self._lock:
            return self._check(header, self.current)

    def _check(self, h: pb.UpdateHeader, rnd: _Round | None) -> str | None:
        if rnd is None:
            return "no round is open"
        if h.round != rnd.number:
            return f"update is for round {h.round}, the open round is {rnd.number}"
        if h.fog_id not in rnd.selected:
            return f"{h.fog_id or '<no id>'} is not selected in round {rnd.number}"
        if h.fog_id in rnd.received:
            return f"{h.fog_id} already sent its update for round {rnd.number}"
        if h.base_version != self.version:
            return f"update is based on v{h.base_version}, the served model is v{self.version}"
        if h.update_kind not in ("delta", "gradient"):
            return f"unknown update kind {h.update_kind!r}"
        asked = rnd.train_override.get(h.fog_id, rnd.announcement.train).update_kind
        if h.update_kind != asked:
            return f"round {rnd.number} asked {h.fog_id} for {asked} updates, got {h.update_kind}"
        if h.num_samples == 0:
            return "update computed on 0 samples"
        if h.total_bytes != len(self._payload):  # same names, shapes and dtype: the same encoding size
            return f"update announces {h.total_bytes} bytes, an update of this model is {len(self._payload)}"
        return None

    def _check_shapes(self, update: Mapping[str, np.ndarray | TensorShape],
                      nonfinite: frozenset[str] | None = None) -> None:
        """Names, shapes, dtype; finiteness from ``nonfinite`` if known, else read from the values."""
        if list(update) != list(self.params):
            raise WireError("update tensor names differ from the model's")
        for k, v in update.items():
            if v.shape != self.params[k].shape:
                raise WireError(f"update tensor {k}: shape {v.shape} != model's {self.params[k].shape}")
            if v.dtype != np.float32:
                raise WireError(f"update tensor {k}: dtype {v.dtype}, expected float32")
            bad = (k in nonfinite) if nonfinite is not None else not all_finite(v)
            if bad:
                raise WireError(f"update tensor {k} holds NaN or infinity")

    def round_complete(self) -> bool:
        """All selected fogs reported, or the deadline passed with at least min_updates."""
        with self._lock:
            rnd = self.current
            if rnd is None:
                return False
            if len(rnd.received) >= len(rnd.selected):
                return True
            expired = time.monotonic() - rnd.started >= rnd.announcement.deadline_s
            return expired

    def wait_round(self, stop: threading.Event | None = None, poll: float = 0.5) -> None:
        """Block until :meth:`round_complete` (woken by each accepted update) or ``stop``."""
        with self._arrived:
            while not self.round_complete() and not (stop is not None and stop.is_set()):
                rnd = self.current
                left = rnd.announcement.deadline_s - (time.monotonic() - rnd.started) if rnd else poll
                self._arrived.wait(timeout=max(0.001, min(poll, left)))

    def finish_round(self) -> RoundMetrics:
        with self._lock:
            rnd = self.current
            assert rnd is not None, "no round is open"
            self._wait_folds(rnd)  # the fold worker never takes the lock: no deadlock
            self.fold_errors_total += rnd.fold_errors
            enough = len(rnd.received) >= rnd.announcement.min_updates
            if rnd.aggregated and enough:
                self.params = self.strategy.end_round(self.cfg.train.lr)
                set_params(self.model, self.params)
                self._payload = encode_tensors(self.params)
                self._payload_digest = payload_digest(self._payload)
                self.version += 1
            else:
                log.warning("round %d closed with %d/%d updates (min %d): model kept at v%d", rnd.number,
                            len(rnd.received), len(rnd.selected), rnd.announcement.min_updates, self.version)
            acc, loss = self.evaluate()
            edge_up = sum(h.edge_bytes_up for h in rnd.received.values())
            edge_down = sum(h.edge_bytes_down for h in rnd.received.values())
            m = RoundMetrics(
                round=rnd.number, model_version=self.version, accuracy=acc, loss=loss,
                labels_used=int(sum(self.labels.values())), bytes_up=rnd.bytes_up, bytes_down=rnd.bytes_down,
                edge_bytes_up=edge_up, edge_bytes_down=edge_down, updates=len(rnd.received),
                wall_s=time.monotonic() - rnd.started, final=rnd.number >= self.cfg.rounds,
            )
            self.history.append(m)
            self.current = None
            self._checkpoint()
            log.info("round %d: accuracy %.4f loss %.4f labels %d (%d updates, %.2fs)", m.round, acc, loss,
                     m.labels_used, m.updates, m.wall_s)
            return m

    def _checkpoint(self) -> None:
        """Write ``checkpoints/latest.{npz,onnx,json}`` off the round's critical path: a single
        background worker (so checkpoints land in order) gets a snapshot of this version."""
        if self.out_dir is None:
            return
        if self._ckpt_pool is None:
            self._ckpt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        for f in [f for f in self._ckpt_futures if f.done()]:
            self._ckpt_futures.remove(f)
            if f.exception() is not None:
                log.error("writing a checkpoint failed: %s", f.exception())
        snapshot = dict(self.params)  # arrays are replaced, never mutated, by finish_round
        meta = {"version": self.version, "round": self.round_no, "arch": self.spec, "payload_xxh3_128": self._payload_digest}
        self._ckpt_futures.append(self._ckpt_pool.submit(self._write_checkpoint, self.out_dir / "checkpoints",
                                                         snapshot, meta))

    def _write_checkpoint(self, d: Path, params: dict[str, np.ndarray], meta: dict) -> None:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "latest.tmp.npz"
        np.savez(tmp, **params)
        tmp.replace(d / "latest.npz")
        (d / "latest.onnx.tmp").write_bytes(exporter_for(self.arch_json)(params))  # a splice, not a re-trace
        (d / "latest.onnx.tmp").replace(d / "latest.onnx")
        (d / "latest.json.tmp").write_text(json.dumps(meta))
        (d / "latest.json.tmp").replace(d / "latest.json")

    def flush(self) -> None:
        """Wait for pending checkpoints (raises what a failed one raised)."""
        futures, self._ckpt_futures = self._ckpt_futures, []
        for f in futures:
            f.result()

    def metrics_document(self) -> dict:
        return {
            "config": self.cfg.model_dump(mode="json"),
            "arch": self.spec,
            "initial_accuracy": self.initial_accuracy,
            "rounds": [m.model_dump(exclude={"final", "model_version"}) | {"model_version": m.model_version}
                       for m in self.history],
            "final_accuracy": self.history[-1].accuracy if self.history else self.initial_accuracy,
            "rejected_updates": self.rejected_total,
            "fold_errors": self.fold_errors_total,
        }

    def write_metrics(self, path: Path | str | None = None) -> Path | None:
        target = Path(path) if path else (self.out_dir / "metrics.json" if self.out_dir else None)
        if target is None:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.metrics_document(), indent=2))
        tmp.replace(target)
        return target


def _masked(h: pb.UpdateHeader) -> bool:
    if not h.defense:
        return False
    try:
        return bool(json.loads(h.defense).get("masking"))
    except (ValueError, AttributeError):
        return False
