"""Defenses the fog applies to its update before uploading it (numpy only).

Order: prune -> clip -> noise -> mask. Deterministic for a given ``rng`` (noise) and
``(secret, round, peers)`` (masks).

- **Pruning** (``prune_ratio``): zero the ``prune_ratio`` fraction of smallest-magnitude entries,
  ranked *globally* over the whole update (all tensors together), so tensors whose entries are
  all small lose more. Exactly ``floor(prune_ratio * size)`` entries are zeroed (ties broken by
  position).
- **Clipping** (``clip``): scale the whole update so that its global L2 norm is at most ``clip``
  (unchanged if already below).
- **Gaussian noise** (``noise_sigma``): i.i.d. N(0, s^2) on every entry with
  ``s = noise_sigma * clip`` when clipping is on (the DP-SGD convention: sigma is the noise
  multiplier of the sensitivity) and ``s = noise_sigma`` (absolute) when ``clip == 0``.
- **Secure-aggregation masking** (``masking``): the fog uploads
  ``num_samples * update + sum_{j in peers, j != i} s_ij * mask_scale * PRG(seed_ij)`` with
  ``s_ij = +1`` if ``fog_id < peer_j`` else ``-1`` and ``PRG`` a standard-normal stream from
  ``numpy.random.default_rng`` seeded by ``sha256(secret | round | sorted pair | tensor name)``.
  Both ends of a pair draw the same mask with opposite signs, so the masks cancel in the sum
  over all selected fogs, and ``sum_i masked_i / sum_i n_i`` is exactly the sample-weighted
  FedAvg mean (see :func:`unmask_sum`); one fog's masked upload alone looks like noise of scale
  ``mask_scale``. Masks are computed in float64 and the result is cast back to the update's
  dtype (float32 on the wire), which leaves a rounding error of about ``mask_scale * 1e-7``
  per entry before the division by ``sum n_i``.

  Simplifications against real secure aggregation (Bonawitz et al. 2017): here the pairwise
  keys derive from one *shared secret* known to every fog (the real protocol agrees on them
  with Diffie-Hellman, so that no single party knows them all), and there is no dropout
  recovery: a masked round needs an update from every selected fog, otherwise the leftover
  masks do not cancel. A round with a single selected fog has no peer to pair with and is sent
  unmasked (scaled by ``num_samples``) with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from kernel.config import DefenseConfig
from kernel.errors import FogflError

log = logging.getLogger(__name__)


class DefenseError(FogflError):
    """The defenses cannot be applied as configured (e.g. masking with the fog not among the
    round's selected peers)."""


def _flat(update: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in update.values()]) \
        if update else np.zeros(0)


def _unflat(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    pos = 0
    for k, v in like.items():
        n = int(np.asarray(v).size)
        out[k] = flat[pos : pos + n].reshape(np.shape(v))
        pos += n
    return out


def prune(update: Mapping[str, np.ndarray], ratio: float) -> dict[str, np.ndarray]:
    """Zero the ``ratio`` fraction of smallest-magnitude entries, ranked over the whole update."""
    flat = _flat(update)
    k = int(np.floor(ratio * flat.size))
    if k > 0:
        idx = np.argsort(np.abs(flat), kind="stable")[:k]
        flat = flat.copy()
        flat[idx] = 0.0
    return _unflat(flat, update)


def global_norm(update: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(v, dtype=np.float64) ** 2)) for v in update.values())))


def clip(update: Mapping[str, np.ndarray], max_norm: float) -> dict[str, np.ndarray]:
    """Scale the update so that its global L2 norm is at most ``max_norm``."""
    norm = global_norm(update)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * factor for k, v in update.items()}


def add_noise(update: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(v)) for k, v in update.items()}


def pair_seed(secret: bytes, round_: int, a: str, b: str, name: str) -> int:
    """Seed of the mask shared by fogs ``a`` and ``b`` for tensor ``name`` in ``round_``; symmetric
    in (a, b)."""
    lo, hi = sorted((a, b))
    h = hashlib.sha256()
    for part in (secret, str(int(round_)).encode(), lo.encode(), hi.encode(), name.encode()):
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    return int.from_bytes(h.digest()[:16], "little")


def mask(update: Mapping[str, np.ndarray], *, fog_id: str, peers: Sequence[str], round_: int, num_samples: int,
         scale: float, secret: bytes = b"fogfl") -> dict[str, np.ndarray]:
    """``num_samples * update`` plus this fog's share of the pairwise masks (float64)."""
    others = sorted(set(peers) - {fog_id})
    out = {k: np.asarray(v, dtype=np.float64) * float(num_samples) for k, v in update.items()}
    for peer in others:
        sign = 1.0 if fog_id < peer else -1.0
        for k, v in out.items():
            prg = np.random.default_rng(pair_seed(secret, round_, fog_id, peer, k))
            v += sign * scale * prg.standard_normal(size=v.shape)
    return out


def apply_defenses(
    update: dict[str, np.ndarray],
    cfg: DefenseConfig,
    *,
    rng: np.random.Generator,
    fog_id: str,
    round_: int,
    peers: list[str],
    num_samples: int,
    secret: bytes = b"fogfl",
) -> dict[str, np.ndarray]:
    """Apply the configured defenses in the order prune -> clip -> noise -> mask. Returns new
    arrays with the input dtypes; the input is not modified."""
    dtypes = {k: np.asarray(v).dtype for k, v in update.items()}
    out: dict[str, np.ndarray] = {k: np.asarray(v, dtype=np.float64) for k, v in update.items()}
    if cfg.prune_ratio > 0:
        out = prune(out, cfg.prune_ratio)
    if cfg.clip > 0:
        out = clip(out, cfg.clip)
    if cfg.noise_sigma > 0:
        std = cfg.noise_sigma * cfg.clip if cfg.clip > 0 else cfg.noise_sigma
        out = add_noise(out, std, rng)
    if cfg.masking:
        if fog_id not in peers:
            raise DefenseError(f"masking: fog {fog_id!r} is not among the round's selected fogs {sorted(peers)}")
        if num_samples <= 0:
            raise DefenseError("masking: num_samples must be positive (it weights the masked update)")
        if len(set(peers)) < 2:
            log.warning("masking: %s is the only selected fog in round %d; its update goes unmasked", fog_id, round_)
        out = mask(out, fog_id=fog_id, peers=peers, round_=round_, num_samples=num_samples,
                   scale=cfg.mask_scale, secret=secret)
    return {k: v.astype(dtypes[k] if np.issubdtype(dtypes[k], np.floating) else np.float32) for k, v in out.items()}


def unmask_sum(masked_list: Sequence[Mapping[str, np.ndarray]], num_samples_list: Sequence[int]) -> dict[str, np.ndarray]:
    """Reference aggregation of masked updates: ``sum_i masked_i / sum_i n_i`` (float64), which
    equals the sample-weighted mean of the unmasked updates when every selected fog's update is
    present."""
    if not masked_list or len(masked_list) != len(num_samples_list):
        raise DefenseError("unmask_sum needs one sample count per masked update (and at least one update)")
    total = float(sum(num_samples_list))
    if total <= 0:
        raise DefenseError("unmask_sum: the sample counts sum to zero")
    keys = list(masked_list[0])
    return {k: sum(np.asarray(m[k], dtype=np.float64) for m in masked_list) / total for k in keys}
