"""The fog's sample pool: what its edges sent, de-duplicated by (edge_id, seq).

With a state directory the pool is durable: each accepted batch is appended to
``<state>/pool/pool.journal`` (:class:`kernel.journal.Journal`) and on stable storage
(``fdatasync``) before the fog acknowledges the batch to the broker; a restarted fog reads the
journal back. Nothing that was accepted is lost, also on a power cut. Pools written by fogfl
0.2.0 (one ``.npz`` file per batch, not fsynced) are read once and moved into the journal.

A record is a 4-byte header length, a JSON header (edge_id, seq, round, x's shape, the lengths of
y and sample_ids) and the raw bytes of x (float32), y and sample_ids (int64), little-endian."""

from __future__ import annotations

import json
import logging
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernel.journal import Journal

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
_F32, _I64 = np.dtype("<f4"), np.dtype("<i8")


@dataclass(frozen=True)
class PooledBatch:
    edge_id: str
    seq: int
    round: int
    x: np.ndarray
    y: np.ndarray
    sample_ids: np.ndarray


def encode_batch(b: PooledBatch) -> bytes:
    x = np.ascontiguousarray(b.x, dtype=_F32)
    y = np.ascontiguousarray(b.y, dtype=_I64)
    ids = np.ascontiguousarray(b.sample_ids, dtype=_I64)
    head = json.dumps({"edge_id": b.edge_id, "seq": int(b.seq), "round": int(b.round), "x_shape": list(x.shape),
                       "n_y": len(y), "n_ids": len(ids)}).encode()
    return b"".join((_LEN.pack(len(head)), head, x.tobytes(), y.tobytes(), ids.tobytes()))


def decode_batch(record: bytes) -> PooledBatch:
    """The inverse of :func:`encode_batch`; ValueError (or KeyError/TypeError) if malformed."""
    (hlen,) = _LEN.unpack_from(record, 0)
    h = json.loads(record[_LEN.size:_LEN.size + hlen])
    pos = _LEN.size + hlen
    shape = tuple(int(d) for d in h["x_shape"])
    parts = []
    for dtype, count in ((_F32, int(np.prod(shape))), (_I64, int(h["n_y"])), (_I64, int(h["n_ids"]))):
        end = pos + count * dtype.itemsize
        if count < 0 or end > len(record):
            raise ValueError("record shorter than its header says")
        parts.append(np.frombuffer(record, dtype, count, pos))
        pos = end
    if pos != len(record):
        raise ValueError("record longer than its header says")
    return PooledBatch(str(h["edge_id"]), int(h["seq"]), int(h["round"]), parts[0].reshape(shape),
                       parts[1].astype(np.int64), parts[2].astype(np.int64))


class SamplePool:
    def __init__(self, state_dir: Path | str | None = None) -> None:
        self.dir = Path(state_dir) / "pool" if state_dir else None
        # an earlier run of this fog left its pool here: this one resumes it
        self.resumed = self.dir is not None and self.dir.is_dir()
        self._batches: list[PooledBatch] = []
        self._seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self.journal: Journal | None = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.journal = Journal(self.dir / "pool.journal")
            self._reload()

    def _keep(self, b: PooledBatch) -> bool:
        key = (b.edge_id, b.seq)
        if key in self._seen:
            return False
        self._batches.append(b)
        self._seen.add(key)
        return True

    def _reload(self) -> None:
        assert self.journal is not None and self.dir is not None
        for i, rec in enumerate(self.journal.records):
            try:
                self._keep(decode_batch(rec))
            except (ValueError, KeyError, TypeError, struct.error):
                log.error("pool journal %s: record %d is unreadable; skipped", self.journal.path, i)
        self.journal.records = []  # decoded: the bytes are not needed twice
        legacy = sorted(self.dir.glob("*.npz"))  # a fogfl 0.2.0 pool: move it into the journal
        for f in legacy:
            try:
                with np.load(f) as z:
                    b = PooledBatch(str(z["edge_id"]), int(z["seq"]), int(z["round"]), z["x"], z["y"],
                                    z["sample_ids"])
            except (OSError, KeyError, ValueError):
                log.error("pool file %s is unreadable; left where it is", f)
                continue
            if self._keep(b):
                self.journal.append(encode_batch(b))
            f.unlink()
        if self._batches:
            log.info("pool restored: %d batches, %d samples%s", len(self._batches), len(self),
                     f" ({len(legacy)} moved from .npz files)" if legacy else "")

    def add(self, b: PooledBatch, sync: bool = True) -> bool:
        """False if (edge_id, seq) was already accepted. With a state directory the batch is on
        stable storage when this returns; an OSError (a full disk) leaves the pool unchanged.
        ``sync=False`` only writes it to the journal: the caller calls :meth:`sync` before it
        acknowledges the batch (the fog's driver trains meanwhile; see ``fog.service``)."""
        with self._lock:
            if (b.edge_id, b.seq) in self._seen:
                return False
            if self.journal is not None:
                self.journal.append(encode_batch(b), sync=sync)
            return self._keep(b)

    def sync(self) -> None:
        """Put batches added with ``sync=False`` on stable storage (OSError if it cannot)."""
        if self.journal is not None:
            self.journal.sync()

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def __len__(self) -> int:
        return sum(len(b.y) for b in self._batches)

    def arrays(self, round_: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All pooled samples (or those acquired in ``round_``), ordered by (round, edge, seq) so that
        training does not depend on the order in which the network delivered the batches."""
        with self._lock:
            sel = [b for b in self._batches if (round_ is None or b.round == round_) and len(b.y)]
        sel.sort(key=lambda b: (b.round, b.edge_id, b.seq))
        if not sel:
            return np.empty((0,), np.float32), np.empty((0,), np.int64)
        return np.concatenate([b.x for b in sel]), np.concatenate([b.y for b in sel])
