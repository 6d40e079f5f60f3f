"""The edge node: transport-free logic. It takes the exact bytes that arrive over MQTT and returns
the messages to publish (:class:`protos.envelope.Publish`); a driver (``edge.service`` over
paho-mqtt, or the in-process engine) delivers them.

The node learns of a round from its fog: the ``EdgeModel`` the fog serves for the round carries
the cloud's announcement verbatim (edges do not subscribe to the cloud's rounds topic, so that an
announcement wakes only the fogs); the run's end comes on the cloud's done topic. Per round the
node, if its fog is selected, waits until it holds a model at least as new as the
announced version, queries ``acquisition.budget`` samples of its unlabeled pool with
``acquisition.strategy``, labels them, removes them from the pool and emits one ``SampleBatch``.
It acts at most once per round. Bad messages (garbage, checksum mismatch, corrupt ONNX, malformed
announcements) are rejected, logged and counted (``rejected``); the node keeps its state and the
model it already had.

Every outgoing batch goes through the node's :class:`~edge.outbox.Outbox` first. With a state
directory, the outbox, the sequence number, the rounds already served and the samples already
sent survive a restart. The outbox's journal is itself the record of each batch's round, seq and
samples (a restart reads them back from it), so the node's ``state.json`` is written only when
the outbox compacts its journal, just before the acknowledged batches' records leave it, not
once per batch. A driver calls :meth:`EdgeNode.delivered` once the broker has the batch.
``durability`` is the outbox's (see :mod:`edge.outbox`): ``"sync"`` syncs each batch before it is
published, ``"async"`` lets the driver publish first and sync while the batch is in flight.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from edge import strategies
from edge.classifier import OnnxClassifier
from edge.labeler import Labeler, OracleLabeler, check_labels
from edge.outbox import Durability, Outbox, atomic_write
from kernel.config import RunConfig
from kernel.data import Dataset, Splits, load_dataset, make_splits
from kernel.errors import ConfigError, ModelError
from protos import fogfl_pb2 as pb
from protos.codec import sha256_hex, tensor_to_pb
from protos.control import Announcement
from protos.envelope import Publish
from protos.errors import WireError
from protos.topics import Topics

log = logging.getLogger(__name__)

_STATE_VERSION = 1


class EdgeNode:
    def __init__(
        self,
        cfg: RunConfig,
        edge_id: str,
        state_dir: Path | str | None = None,
        *,
        labeler: Labeler | None = None,
        dataset: Dataset | None = None,
        splits: Splits | None = None,
        threads: int = 1,
        track_delivery: bool = True,
        durability: Durability = "sync",
    ) -> None:
        """``dataset`` / ``splits`` may be passed in by a driver that hosts many edges (they are
        what ``load_dataset(cfg.data)`` / ``make_splits(cfg, dataset)`` return).
        ``track_delivery=False`` is for a driver that delivers every returned message at once (the
        in-process engine): batches are then not kept in the outbox waiting for
        :meth:`delivered`. ``threads`` caps onnxruntime's and BLAS/OpenMP's threads."""
        self.cfg = cfg
        self.edge_id = edge_id
        self.index = cfg.edge_index(edge_id)
        self.fog_id = cfg.fog_ids()[self.index // cfg.topology.edges_per_fog]
        if edge_id not in cfg.edge_ids(self.fog_id):
            raise ConfigError(f"edge id {edge_id!r} is not canonical; use one of {cfg.edge_ids(self.fog_id)}")
        self.topics = Topics(cfg.run_id)
        ds = dataset if dataset is not None else load_dataset(cfg.data)
        sp = splits if splits is not None else make_splits(cfg, ds)
        self._x = ds.x
        self.num_classes = ds.num_classes
        self.pool_ids = np.sort(np.asarray(sp.edges[self.index], dtype=np.int64))
        self._available = np.ones(len(self.pool_ids), dtype=bool)
        self.labeler: Labeler = labeler if labeler is not None else OracleLabeler(ds.y)
        self.threads = threads
        self.track_delivery = track_delivery

        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.outbox = Outbox(self.state_dir / "outbox" if self.state_dir is not None else None, durability)
        self._acted: set[int] = set()

        self.model: OnnxClassifier | None = None
        self.model_version = -1
        self.model_sha = ""
        self._pending: Announcement | None = None
        self.finished = False

        self.labels_sent = 0
        self.bytes_sent = 0
        self.rejected = 0
        self.last_query_ms = 0.0

        self._load_state()
        self._save_state()  # claims the state dir for this edge and records what the outbox told
        strategies.preload()  # pay modAL's import now rather than in the first round
        log.info("%s: pool of %d samples (%d already sent), fog %s", edge_id, len(self.pool_ids),
                 int((~self._available).sum()), self.fog_id)

    # -- public state ---------------------------------------------------------------------------
    @property
    def pool_size(self) -> int:
        """Samples still unlabeled in this edge's pool."""
        return int(self._available.sum())

    @property
    def pending_round(self) -> int | None:
        return None if self._pending is None else self._pending.round

    @property
    def acted_rounds(self) -> list[int]:
        return sorted(self._acted)

    def stats(self) -> dict[str, int | float]:
        return {"labels_sent": self.labels_sent, "bytes_sent": self.bytes_sent, "rejected": self.rejected,
                "pool": self.pool_size, "model_version": self.model_version, "outbox": len(self.outbox),
                "last_query_ms": round(self.last_query_ms, 3)}

    # -- messages in ----------------------------------------------------------------------------
    def on_model(self, payload: bytes) -> list[Publish]:
        """An ``EdgeModel`` from this edge's fog, with the announcement of the round it is served
        for: returns this edge's SampleBatch for that round (or for a round that was waiting for
        this model). An empty payload (a retained message being cleared) is ignored; a model that
        is unusable is rejected with its announcement."""
        if not payload:
            return []
        msg = pb.EdgeModel()
        try:
            msg.ParseFromString(payload)
        except Exception as exc:  # protobuf's DecodeError, or others on garbage
            return self._reject("model", f"not an EdgeModel ({exc.__class__.__name__})")
        if not msg.onnx:
            return self._reject("model", f"EdgeModel v{msg.version} carries no ONNX bytes")
        if msg.version < 0:
            return self._reject("model", f"EdgeModel has a negative version {msg.version}")
        digest = sha256_hex(msg.onnx)
        if digest != msg.sha256:
            return self._reject("model", f"EdgeModel v{msg.version}: sha256 mismatch "
                                         f"(computed {digest[:12]}, message says {msg.sha256[:12] or 'nothing'})")
        if self.model is not None and msg.version < self.model_version:
            log.info("%s: ignoring model v%d, already on v%d", self.edge_id, msg.version, self.model_version)
        elif self.model is None or msg.version != self.model_version or digest != self.model_sha:
            try:
                clf = OnnxClassifier(msg.onnx, threads=self.threads)
                self._check_fits(clf)
            except ModelError as exc:
                return self._reject("model", f"EdgeModel v{msg.version}: {exc}")
            self.model, self.model_version, self.model_sha = clf, int(msg.version), digest
            log.debug("%s: model v%d loaded (%s, %d bytes)", self.edge_id, msg.version, msg.arch or "?",
                      len(msg.onnx))
        # else: a retained re-delivery of the model this edge has
        if msg.announcement:  # the round the fog serves this model for
            return self.on_announcement(msg.announcement.encode())
        return self._resume()

    def on_announcement(self, payload: bytes) -> list[Publish]:
        """A round announcement (JSON): the one an ``EdgeModel`` carries, or the run's end from the
        cloud's done topic. Returns this edge's SampleBatch when it can act now. An empty payload
        (the retained announcement being cleared) is ignored."""
        if not payload:
            return []
        try:
            ann = Announcement.from_json(payload)
        except WireError as exc:
            return self._reject("announcement", str(exc))
        if ann.run_id != self.cfg.run_id:
            return self._reject("announcement", f"for run {ann.run_id!r}, this edge is in run {self.cfg.run_id!r}")
        if ann.kind == "done":
            if not self.finished:
                log.info("%s: run finished (round %d)", self.edge_id, ann.round)
            self.finished = True
            self._pending = None
            return []
        if self.fog_id not in ann.selected:
            log.debug("%s: round %d does not select %s", self.edge_id, ann.round, self.fog_id)
            return []
        if self._acted and ann.round <= max(self._acted):
            return []  # served already (retained re-delivery), or older than what we served
        if self._pending is not None and ann.round < self._pending.round:
            return []
        try:
            strategies.canonical(ann.acquisition.strategy)
        except ConfigError as exc:
            return self._reject("announcement", f"round {ann.round}: {exc}")
        self._pending = ann
        if self.model is None or self.model_version < ann.model_version:
            log.debug("%s: round %d waits for model v%d (have v%d)", self.edge_id, ann.round, ann.model_version,
                     self.model_version)
        return self._resume()

    def delivered(self, msg: Publish | int) -> bool:
        """The broker (or the in-process engine) has the batch ``msg`` (a Publish this node
        returned, or its seq): it is no longer pending in the outbox. (Its record stays in the
        outbox's journal until a compaction, which writes the node's state first.)"""
        seq = msg if isinstance(msg, int) else next(
            (e.seq for e in self.outbox.pending() if e.msg is msg or e.msg == msg), None)
        if seq is None or not self.outbox.ack(seq):
            return False
        if self.outbox.needs_compaction:
            # the journal's records of acknowledged batches are about to go: the state takes them over
            try:
                self._save_state()
                self.outbox.compact(counter_saved=self.state_dir is not None)  # next_seq is in the state
            except OSError as exc:  # a full disk: the journal keeps everything; compaction is tried again
                log.warning("%s: could not compact the outbox (%s); will try again at the next ack", self.edge_id,
                            exc.strerror or exc)
        return True

    def preload(self, onnx: bytes, version: int = 0, source: str = "file") -> None:
        """Start with a model shipped with the device (e.g. the cloud's ``checkpoints/latest.onnx``)
        as version ``version``; the fog's models replace it. Raises ModelError (one line) if unusable."""
        clf = OnnxClassifier(onnx, threads=self.threads)
        self._check_fits(clf)
        self.model, self.model_version, self.model_sha = clf, int(version), sha256_hex(onnx)
        log.info("%s: preloaded model v%d from %s (%d bytes)", self.edge_id, version, source, len(onnx))

    # -- internals ------------------------------------------------------------------------------
    def _reject(self, what: str, reason: str) -> list[Publish]:
        self.rejected += 1
        log.warning("%s: rejected %s: %s", self.edge_id, what, reason)
        return []

    def _check_fits(self, clf: OnnxClassifier) -> None:
        want = tuple(self._x.shape[1:])
        if clf.in_shape_ != want:
            raise ModelError(f"model takes inputs of shape {clf.in_shape_}, this edge's data is {want}")
        if len(clf.classes_) != self.num_classes:
            raise ModelError(f"model has {len(clf.classes_)} outputs, the dataset has {self.num_classes} classes")
        probe = self._x[self.pool_ids[:8]] if len(self.pool_ids) else np.zeros((1, *want), np.float32)
        if not np.all(np.isfinite(clf.decision_function(probe))):
            raise ModelError("model returns non-finite logits on this edge's data")

    def _resume(self) -> list[Publish]:
        ann = self._pending
        if ann is None or self.model is None or self.model_version < ann.model_version:
            return []
        self._pending = None
        return [self._act(ann)]

    def _act(self, ann: Announcement) -> Publish:
        acq = ann.acquisition
        name = strategies.canonical(acq.strategy)
        rng = np.random.default_rng([self.cfg.seed, self.index, ann.round])
        t0 = time.perf_counter()
        avail = np.flatnonzero(self._available)
        labeled = self._x[self.pool_ids[~self._available]] if name == "ranked-batch" else None
        ids, scores = strategies.query(name, self.model, self._x, acq.budget, rng, subset=acq.subset,
                                       candidates=self.pool_ids[avail], labeled=labeled,
                                       threads=self.threads)
        self.last_query_ms = (time.perf_counter() - t0) * 1e3
        x = self._x[ids]
        y = check_labels(self.labeler.label(ids, x), len(ids), self.labeler)
        seq = self.outbox.next_seq()
        batch = pb.SampleBatch(
            edge_id=self.edge_id, fog_id=self.fog_id, seq=seq, round=ann.round, model_version=self.model_version,
            x=tensor_to_pb("x", x), y=y.tolist(), sample_ids=ids.tolist(),
            scores=scores.astype(np.float32).tolist(), strategy=name,
        )
        pub = Publish(topic=self.topics.samples(self.fog_id), payload=batch.SerializeToString(), qos=1, retain=False)
        if self.track_delivery:
            self.outbox.put(seq, pub)  # stored before anything else changes; it records this batch
        self._available[np.searchsorted(self.pool_ids, ids)] = False
        self._acted.add(ann.round)
        if not self.track_delivery:
            self._save_state()  # no outbox entry records this batch: the state must
        self.labels_sent += len(ids)
        self.bytes_sent += len(pub.payload)
        log.info("%s: round %d: %d samples by %s (model v%d, %.1f ms query), seq %d, %d left in pool",
                 self.edge_id, ann.round, len(ids), name, self.model_version, self.last_query_ms, seq, self.pool_size)
        return pub

    # -- persistence ----------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"run_id": self.cfg.run_id, "edge_id": self.edge_id, "seed": self.cfg.seed,
                "dataset": self.cfg.data.dataset, "pool": len(self.pool_ids)}

    def _save_state(self) -> None:
        if self.state_dir is None:
            return
        sent = self.pool_ids[~self._available]
        state = {"version": _STATE_VERSION, **self._identity(), "acted_rounds": sorted(self._acted),
                 "next_seq": self.outbox.next, "sent_ids": sent.tolist()}
        atomic_write(self.state_dir / "state.json", json.dumps(state).encode())

    def _load_state(self) -> None:
        if self.state_dir is None:
            return
        path = self.state_dir / "state.json"
        sent: list[int] = []
        if path.exists():
            try:
                state = json.loads(path.read_text())
                ident = {k: state[k] for k in self._identity()}
                acted, sent = [int(r) for r in state["acted_rounds"]], [int(i) for i in state["sent_ids"]]
                next_seq = int(state.get("next_seq", 1))
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError(f"edge state {path} is unreadable; delete it (and the outbox beside it) "
                                  f"to start this edge afresh") from None
            if ident != self._identity():
                raise ConfigError(f"state dir {self.state_dir} belongs to {ident}, not to this edge "
                                  f"({self._identity()}); use another state dir")
            self._acted.update(acted)
            self.outbox.advance(next_seq)
        # Batches the outbox's journal recorded since the state was written: count their rounds
        # and samples as done (acknowledged or still pending).
        for entry in self.outbox.recorded():
            b = pb.SampleBatch()
            try:
                b.ParseFromString(entry.msg.payload)
            except Exception:  # not ours to interpret; it is still sent as it is
                continue
            if b.edge_id == self.edge_id:
                self._acted.add(int(b.round))
                sent.extend(int(i) for i in b.sample_ids)
        if sent and len(self.pool_ids):
            pos = np.searchsorted(self.pool_ids, np.asarray(sent, dtype=np.int64))
            ok = (pos < len(self.pool_ids)) & (self.pool_ids[np.minimum(pos, len(self.pool_ids) - 1)] == sent)
            self._available[pos[ok]] = False
