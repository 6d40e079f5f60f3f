"""Labelers: who puts a label on the samples a query strategy picked.

In the testbed the labeler is an oracle that knows the dataset's labels. In a plant it would be a
person at a terminal or a labelling service; those plug in through the same :class:`Labeler`
protocol (the edge node calls ``label`` once per acquisition, from its worker thread, so a
blocking implementation is fine).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Labeler(Protocol):
    name: str

    def label(self, sample_ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Labels (int64, one per sample, >= 0) for the samples ``x`` (n, C, H, W), which are
        the dataset entries ``sample_ids``."""
        ...


class OracleLabeler:
    """Knows every label of the dataset (the testbed's labeler)."""

    name = "oracle"

    def __init__(self, labels: np.ndarray) -> None:
        self._labels = np.asarray(labels, dtype=np.int64)

    def label(self, sample_ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        ids = np.asarray(sample_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self._labels)):
            raise ValueError(f"sample ids outside the dataset (0..{len(self._labels) - 1})")
        return self._labels[ids].copy()


def check_labels(labels: np.ndarray, n: int, labeler: Labeler) -> np.ndarray:
    """Validate a labeler's answer: one non-negative integer label per sample."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labeler {labeler.name!r} returned {y.shape} labels for {n} samples")
    if n and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
        raise ValueError(f"labeler {labeler.name!r} returned labels that are not non-negative integers")
    return y.astype(np.int64, copy=False)
