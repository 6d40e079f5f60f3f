"""Partition a pool of sample indices over edges: iid, Dirichlet(alpha) over classes, or a fixed
class split (e.g. the 2/2/3/3 split of Qian et al.). Deterministic by seed."""

from __future__ import annotations

import numpy as np

from kernel.errors import ConfigError


def partition_indices(
    y: np.ndarray,
    pool: np.ndarray,
    n_parts: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    class_split: list[list[int]] | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    if n_parts < 1:
        raise ConfigError("need at least one edge to partition over")
    rng = np.random.default_rng([seed, 0x9A27])
    pool = np.asarray(pool)
    if scheme == "iid":
        shuffled = rng.permutation(pool)
        return [np.sort(p) for p in np.array_split(shuffled, n_parts)]
    if scheme == "dirichlet":
        return _dirichlet(y, pool, n_parts, alpha, rng)
    if scheme == "classes":
        return _class_split(y, pool, n_parts, class_split or [], rng)
    raise ConfigError(f"unknown partition scheme {scheme!r} (iid, dirichlet, classes)")


def _dirichlet(y, pool, n_parts, alpha, rng) -> list[np.ndarray]:
    """Per class, split its samples over parts with proportions ~ Dir(alpha). Parts that end up
    empty get one sample moved from the largest part, so every edge has something to offer."""
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for c in np.unique(y[pool]):
        idx = rng.permutation(pool[y[pool] == c])
        props = rng.dirichlet(np.full(n_parts, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for k, piece in enumerate(np.split(idx, cuts)):
            parts[k].extend(piece.tolist())
    for k in range(n_parts):
        if not parts[k]:
            donor = max(range(n_parts), key=lambda i: len(parts[i]))
            if len(parts[donor]) > 1:
                parts[k].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _class_split(y, pool, n_parts, class_split, rng) -> list[np.ndarray]:
    if not class_split:
        raise ConfigError("partition 'classes' needs data.class_split, e.g. [[0,1],[2,3],[4,5,6],[7,8,9]]")
    groups = len(class_split)
    seen: set[int] = set()
    for classes in class_split:
        twice = seen.intersection(classes)
        if twice:  # a sample would land on two edges
            raise ConfigError(f"data.class_split lists class {min(twice)} in more than one group")
        seen.update(classes)
    members = {g: [k for k in range(n_parts) if k % groups == g] for g in range(groups)}
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for g, classes in enumerate(class_split):
        if not members[g]:
            continue
        idx = rng.permutation(pool[np.isin(y[pool], classes)])
        for k, piece in zip(members[g], np.array_split(idx, len(members[g])), strict=True):
            parts[k].extend(piece.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
