"""The fog's sample pool: what its edges sent, de-duplicated by (edge_id, seq), durable when a
state directory is given (each accepted batch is written before it is acknowledged as accepted,
and reloaded on restart), so nothing that was accepted is lost."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PooledBatch:
    edge_id: str
    seq: int
    round: int
    x: np.ndarray
    y: np.ndarray
    sample_ids: np.ndarray


class SamplePool:
    def __init__(self, state_dir: Path | str | None = None) -> None:
        self.dir = Path(state_dir) / "pool" if state_dir else None
        # an earlier run of this fog left its pool here: this one resumes it
        self.resumed = self.dir is not None and self.dir.is_dir()
        self._batches: list[PooledBatch] = []
        self._seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._reload()

    def _reload(self) -> None:
        assert self.dir is not None
        for f in sorted(self.dir.glob("*.npz")):
            try:
                with np.load(f) as z:
                    b = PooledBatch(str(z["edge_id"]), int(z["seq"]), int(z["round"]), z["x"], z["y"],
                                    z["sample_ids"])
            except (OSError, KeyError, ValueError):
                log.error("pool file %s is unreadable; skipped", f)
                continue
            self._batches.append(b)
            self._seen.add((b.edge_id, b.seq))
        if self._batches:
            log.info("pool restored: %d batches, %d samples", len(self._batches), len(self))

    def add(self, b: PooledBatch) -> bool:
        """False if (edge_id, seq) was already accepted."""
        key = (b.edge_id, b.seq)
        with self._lock:
            if key in self._seen:
                return False
            if self.dir is not None:
                path = self.dir / f"{b.edge_id}-{b.seq:08d}.npz"
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, edge_id=b.edge_id, seq=b.seq, round=b.round, x=b.x, y=b.y, sample_ids=b.sample_ids)
                os.replace(tmp, path)
            self._batches.append(b)
            self._seen.add(key)
            return True

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
