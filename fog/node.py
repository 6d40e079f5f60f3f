"""The fog gateway as transport-free logic. The network driver (``fog.service``) and the
in-process engine feed it the same wire bytes:

    ann = fog.on_announcement(bytes)          # -> Announcement if this fog takes part
    pubs = fog.on_model(model_header, payload)  # -> [Publish(EdgeModel)] for its edges, carrying
                                                #    the announcement (edges learn of rounds so)
    fog.on_samples(bytes)                      # SampleBatch from an edge (MQTT)
    if fog.acquisition_complete(): header, payload = fog.train()   # -> upload
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np

from fog.pool import PooledBatch, SamplePool
from fog.trainer import local_update
from kernel.config import RunConfig
from kernel.errors import ModelError
from kernel.onnx_splice import exporter_for
from protos import fogfl_pb2 as pb
from protos.capture import write_truth
from protos.codec import ChunkedPayload, decode_tensors, encode_tensors, sha256_hex, tensor_from_pb
from protos.control import Announcement, TrainConfig
from protos.envelope import Publish
from protos.errors import WireError
from protos.topics import Topics

log = logging.getLogger(__name__)


class FogNode:
    def __init__(self, cfg: RunConfig, fog_id: str, state_dir: Path | str | None = None,
                 truth_dir: Path | str | None = None) -> None:
        if fog_id not in cfg.fog_ids():
            raise ValueError(f"fog id {fog_id!r} is not in the topology ({', '.join(cfg.fog_ids()[:3])}, …)")
        self.cfg = cfg
        self.fog_id = fog_id
        self.topics = Topics(cfg.run_id)
        self.edges = set(cfg.edge_ids(fog_id))
        self.pool = SamplePool(state_dir)
        self.truth_dir = Path(truth_dir) if truth_dir else None
        self.announcement: Announcement | None = None
        self.announcement_json = b""  # the current announcement as the cloud sent it, for the edges
        self.last_round = 0
        self.finished = False
        self.spec: dict | None = None
        self.served: dict[str, np.ndarray] | None = None
        self.model_version = -1
        self.train_override: TrainConfig | None = None  # this round's config, if the cloud sent one
        self.delivered: dict[int, set[str]] = {}
        self.edge_bytes_up: dict[int, int] = {}
        self.edge_bytes_down: dict[int, int] = {}
        self.rejected = 0
        self._lock = threading.Lock()
        self._acquired = threading.Event()  # set when every edge delivered for the current round

    # ------------------------------------------------------------ messages in
    def on_announcement(self, payload: bytes) -> Announcement | None:
        """The round to take part in, or None (not selected, old, empty, done, or malformed)."""
        if not payload:
            return None
        try:
            ann = Announcement.from_json(payload)
        except WireError as exc:
            self._reject(f"announcement: {exc}")
            return None
        if ann.run_id != self.cfg.run_id:
            return None
        if ann.kind == "done":
            self.finished = True
            return None
        if self.fog_id not in ann.selected:
            return None
        with self._lock:  # the announcement may come from MQTT and with a model asked for ahead at once
            if ann.round <= self.last_round:
                return None
            self.announcement, self.announcement_json = ann, bytes(payload)
            self.last_round = ann.round
            self.delivered.setdefault(ann.round, set())
            self._acquired.clear()
        if self.acquisition_complete():
            self._acquired.set()
        return ann

    def on_model(self, header: pb.ModelHeader, payload: bytes | memoryview | ChunkedPayload) -> list[Publish]:
        """Take the global model served by the cloud; pass it to the edges as ONNX, with the
        announcement of the round it is served for (verbatim), which is how the edges learn of
        the round."""
        try:
            spec = json.loads(header.arch_json)
            params = decode_tensors(payload)
            train = TrainConfig.model_validate_json(header.train_json) if header.train_json else None
            onnx = exporter_for(header.arch_json)(params)  # checks names and shapes
        except (ValueError, KeyError, TypeError, WireError, ModelError) as exc:  # ValidationError is a ValueError
            reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise WireError(f"model v{header.version} from the cloud is unusable: {reason}") from None
        with self._lock:
            self.spec, self.served, self.model_version = spec, params, int(header.version)
            self.train_override = train
            ann = self.announcement
            relayed = self.announcement_json if ann is not None and ann.round == header.round else b""
        msg = pb.EdgeModel(version=header.version, round=header.round, onnx=onnx, sha256=sha256_hex(onnx),
                           arch=spec.get("arch", ""), announcement=relayed.decode())
        data = msg.SerializeToString()
        rnd = int(header.round)
        self.edge_bytes_down[rnd] = self.edge_bytes_down.get(rnd, 0) + len(data) * len(self.edges)
        return [Publish(self.topics.edge_model(self.fog_id), data, qos=1, retain=True)]

    def on_samples(self, payload: bytes, *, sync: bool = True) -> bool:
        """Validate and pool a SampleBatch. False (logged, counted) if rejected or a duplicate.
        ``sync=False``: the batch counts (training may start) once written to the pool's journal;
        the caller puts it on stable storage (``pool.sync()``) before acknowledging it."""
        b = pb.SampleBatch()
        try:
            b.ParseFromString(payload)
            x = tensor_from_pb(b.x) if b.HasField("x") else np.empty((0,), np.float32)
        except Exception as exc:  # DecodeError or WireError
            return self._reject(f"sample batch undecodable ({exc.__class__.__name__}: {exc})")
        y = np.asarray(b.y, dtype=np.int64)
        reason = self._check_batch(b, x, y)
        if reason:
            return self._reject(f"sample batch from {b.edge_id or '?'} seq {b.seq}: {reason}")
        added = self.pool.add(PooledBatch(b.edge_id, int(b.seq), int(b.round), x.astype(np.float32, copy=False),
                                          y, np.asarray(b.sample_ids, dtype=np.int64)), sync=sync)
        with self._lock:
            self.delivered.setdefault(int(b.round), set()).add(b.edge_id)
            if added:
                self.edge_bytes_up[int(b.round)] = self.edge_bytes_up.get(int(b.round), 0) + len(payload)
        if not added:
            log.debug("duplicate batch %s/%d ignored", b.edge_id, b.seq)
        if self.acquisition_complete():
            self._acquired.set()
        return added

    def _check_batch(self, b: pb.SampleBatch, x: np.ndarray, y: np.ndarray) -> str | None:
        if b.edge_id not in self.edges:
            return f"edge {b.edge_id!r} does not belong to {self.fog_id}"
        if b.fog_id != self.fog_id:
            return f"addressed to {b.fog_id!r}"
        if len(y) == 0:
            return None  # an exhausted edge reports that it has nothing left
        if x.dtype != np.float32 or x.ndim != 4 or len(x) != len(y):
            return f"x must be float32 (n, C, H, W) with one label each, got {x.dtype} {x.shape} / {len(y)} labels"
        if self.spec is not None and list(x.shape[1:]) != list(self.spec["in_shape"]):
            return f"sample shape {list(x.shape[1:])} != model input {self.spec['in_shape']}"
        if not np.isfinite(x).all():
            return "x holds NaN or infinity"
        k = self.spec["num_classes"] if self.spec else None
        if (y < 0).any() or (k is not None and (y >= k).any()):
            return f"labels outside [0, {k})"
        return None

    def _reject(self, why: str) -> bool:
        self.rejected += 1
        log.warning("%s rejected %s", self.fog_id, why)
        return False

    # ------------------------------------------------------------ round work
    def acquisition_complete(self) -> bool:
        ann = self.announcement
        if ann is None:
            return False
        if ann.acquisition.budget == 0:
            return True
        with self._lock:
            return self.edges <= self.delivered.get(ann.round, set())

    def wait_acquisition(self, timeout: float) -> bool:
        """Block until every edge delivered for the current round (True) or ``timeout`` (False)."""
        return self._acquired.wait(timeout) or self.acquisition_complete()

    def train(self) -> tuple[pb.UpdateHeader, bytes]:
        ann = self.announcement
        if ann is None or self.served is None or self.spec is None:
            raise RuntimeError("train() before an announcement and a model")
        train = self.train_override or ann.train
        x, y = self.pool.arrays(ann.round if train.train_on == "round" else None)
        if len(y) == 0:
            raise RuntimeError(f"{self.fog_id}: no samples to train on in round {ann.round}")
        seed = int(np.random.default_rng([self.cfg.seed, ann.round, self.cfg.fog_ids().index(self.fog_id)])
                   .integers(2**31))
        res = local_update(self.spec, self.served, x, y, train, seed=seed)
        update = res.update
        defense = self.cfg.defense
        defense_json = ""
        if defense.clip or defense.noise_sigma or defense.prune_ratio or defense.masking:
            from fog.defenses import apply_defenses

            update = apply_defenses(update, defense, rng=np.random.default_rng(seed), fog_id=self.fog_id,
                                    round_=ann.round, peers=list(ann.selected), num_samples=res.num_samples)
            defense_json = defense.model_dump_json()
        if self.truth_dir is not None:
            write_truth(self.truth_dir, ann.round, self.fog_id, x, y)
        payload = encode_tensors(update)
        counts = np.bincount(y, minlength=self.spec["num_classes"])
        header = pb.UpdateHeader(
            fog_id=self.fog_id, round=ann.round, base_version=self.model_version, num_samples=res.num_samples,
            update_kind=train.update_kind, hparams=res.hparams, total_bytes=len(payload),
            labels_total=len(self.pool), edge_bytes_up=self.edge_bytes_up.get(ann.round, 0),
            edge_bytes_down=self.edge_bytes_down.get(ann.round, 0), defense=defense_json,
            train_loss=res.loss,
            label_counts={int(c): int(n) for c, n in enumerate(counts) if n} if train.report_label_counts else {},
        )
        log.info("%s round %d: trained on %d samples (loss %.4f, %d steps)", self.fog_id, ann.round,
                 res.num_samples, res.loss, res.hparams.steps)
        return header, payload
