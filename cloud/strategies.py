"""Aggregation strategies of the cloud: FedAvg, FedProx, Fed2 (feature-paired averaging) and the
robust aggregators (coordinate-wise median, trimmed mean, Krum).

The cloud node drives one round as::

    fogs = strategy.select(fog_ids, fraction, rng)     # partial participation
    train = strategy.configure(round_, cfg.train)      # the round config announced to the fogs
    strategy.begin_round(global_params, spec)
    strategy.add_update(fog_id, update, num_samples, kind, meta)   # as each update arrives
    new_params = strategy.end_round(server_lr)

``kind == "delta"``: new = global + agg; ``kind == "gradient"``: new = global - server_lr * agg.
``meta`` may hold ``{"masked": True}`` (secure aggregation: the update arrives multiplied by its
sample count, with pairwise masks that cancel in the plain sum, so the aggregate is
sum / total samples) and ``{"label_counts": {class: count}}`` (used by Fed2).

The averaging strategies fold each update into a running accumulator as it arrives and keep no
update; the robust ones must see all updates at once and hold them until ``end_round``.
Memory and numerics are described in docs/strategies.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.linalg.blas import daxpy, saxpy, sscal

from kernel.config import CloudConfig
from kernel.errors import ConfigError, FogflError
from protos.blas import one_blas_thread
from protos.control import TrainConfig

log = logging.getLogger(__name__)

KINDS = ("delta", "gradient")
DEFAULT_PROX_MU = 0.01
_CHUNK = 1 << 15  # float64 scratch of 256 KiB: stays in L2 while a chunk is converted and added


class AggregationError(FogflError, ValueError):
    """An update cannot be aggregated in this round (mixed kinds, wrong tensors, masked updates
    given to a robust aggregator, ...)."""


Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class Admitted:
    """An update :meth:`Strategy.admit` accepted, waiting for :meth:`Strategy.fold`."""

    fog_id: str
    update: Mapping[str, np.ndarray]
    num_samples: int
    masked: bool
    meta: Mapping


class Strategy:
    """Base class: selection, round config, and the update bookkeeping every strategy shares."""

    name = "base"

    def __init__(self) -> None:
        self._global: Params = {}
        self._spec: dict = {}
        self._kind: str | None = None
        self._masked: bool | None = None
        self._fogs: set[str] = set()

    # ------------------------------------------------------------------ selection and config
    def select(self, fog_ids: list[str], fraction: float, rng: np.random.Generator) -> list[str]:
        """ceil(fraction * n) fogs (at least one), drawn without replacement by ``rng``; sorted.
        The draw is over the sorted ids, so the input order does not matter."""
        if not 0 < fraction <= 1:
            raise ConfigError(f"participation fraction must be in (0, 1], got {fraction}")
        ids = sorted(set(fog_ids))
        if not ids:
            return []
        k = min(len(ids), max(1, math.ceil(round(fraction * len(ids), 9))))
        if k == len(ids):
            return ids
        picked = rng.choice(len(ids), size=k, replace=False)
        return sorted(ids[i] for i in picked)

    def configure(self, round_: int, train: TrainConfig) -> TrainConfig:
        """The training config announced for ``round_``."""
        return train.model_copy()

    # ------------------------------------------------------------------ round
    def begin_round(self, global_params: Mapping[str, np.ndarray], spec: dict) -> None:
        self._global = dict(global_params)
        self._spec = dict(spec)
        self._kind = None
        self._masked = None
        self._fogs = set()
        self._reset()

    def add_update(self, fog_id: str, update: Mapping[str, np.ndarray], num_samples: int, kind: str,
                   meta: Mapping | None = None) -> None:
        """Check an update and fold it into the round's aggregate (:meth:`admit` then :meth:`fold`)."""
        self.fold(self.admit(fog_id, update, num_samples, kind, meta))

    def admit(self, fog_id: str, update: Mapping[str, np.ndarray], num_samples: int, kind: str,
              meta: Mapping | None = None) -> Admitted:
        """Check an update against the round (raises AggregationError) and count it in; the work on
        its values is left to :meth:`fold`. A caller may acknowledge the update once admitted and
        fold it later (the cloud does, on one worker thread, in admission order), provided every
        admitted update is folded before :meth:`end_round`."""
        meta = meta or {}
        masked = bool(meta.get("masked", False))
        self._check(fog_id, update, num_samples, kind, masked)
        self._fogs.add(fog_id)
        self._kind = kind
        self._masked = masked
        return Admitted(fog_id, update, int(num_samples), masked, meta)

    def fold(self, admitted: Admitted) -> None:
        """Fold an admitted update's values into the aggregate."""
        self._add(admitted.fog_id, admitted.update, admitted.num_samples, admitted.masked, admitted.meta)

    def end_round(self, server_lr: float) -> Params:
        """The new global parameters (float32). With no update, the global model unchanged."""
        if not self._fogs:
            log.warning("%s: no update this round; the global model is kept", self.name)
            return {k: np.array(v, dtype=np.float32, copy=True) for k, v in self._global.items()}
        out = self._finish(server_lr)
        self._reset()
        self._fogs = set()
        return out

    @property
    def received(self) -> int:
        return len(self._fogs)

    # ------------------------------------------------------------------ for subclasses
    def _reset(self) -> None:
        raise NotImplementedError

    def _add(self, fog_id: str, update: Mapping[str, np.ndarray], num_samples: int, masked: bool,
             meta: Mapping) -> None:
        raise NotImplementedError

    def _finish(self, server_lr: float) -> Params:
        raise NotImplementedError

    def _check(self, fog_id: str, update: Mapping[str, np.ndarray], num_samples: int, kind: str,
               masked: bool) -> None:
        if not self._global:
            raise AggregationError(f"{self.name}: add_update before begin_round")
        if kind not in KINDS:
            raise AggregationError(f"update from {fog_id}: unknown kind {kind!r} (delta or gradient)")
        if self._kind is not None and kind != self._kind:
            raise AggregationError(f"update from {fog_id} is a {kind}, this round aggregates {self._kind}s")
        if self._masked is not None and masked != self._masked:
            raise AggregationError(f"update from {fog_id}: masked and unmasked updates cannot be mixed in a round")
        if fog_id in self._fogs:
            raise AggregationError(f"{fog_id} already sent an update this round")
        if num_samples <= 0:
            raise AggregationError(f"update from {fog_id} claims {num_samples} samples")
        if update.keys() != self._global.keys():
            missing = sorted(set(self._global) - set(update))[:3]
            extra = sorted(set(update) - set(self._global))[:3]
            raise AggregationError(f"update from {fog_id}: tensor names differ from the model's "
                                   f"(missing {missing}, unexpected {extra})")
        for k, g in self._global.items():
            u = update[k]
            shape = u.shape if isinstance(u, np.ndarray) else np.shape(u)
            if shape != g.shape:
                raise AggregationError(f"update from {fog_id}: tensor {k} has shape {shape}, "
                                       f"the model's is {g.shape}")

    def _new_params(self, agg: Mapping[str, np.ndarray], server_lr: float) -> Params:
        """global + agg (delta) or global - server_lr * agg (gradient), as new float32 arrays."""
        out = {}
        for k, g in self._global.items():
            a = np.asarray(agg[k])
            if self._kind == "gradient":
                out[k] = (g - server_lr * a).astype(np.float32, copy=False)
            else:
                out[k] = (g + a).astype(np.float32, copy=False)
        return out


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


class FedAvg(Strategy):
    """Sample-weighted mean of the updates, folded in as they arrive.

    One accumulator per tensor; each update is added as ``acc += w * u`` in place (BLAS axpy: one
    fused pass, no scaled copy). ``precision="float32"`` (default) keeps a float32 accumulator
    (extra memory: one model); ``"float64"`` a float64 one (two models, plus a 256 KiB scratch
    through which each chunk is widened before the add). Masked (secure-aggregation) rounds always
    use float64, because large masks cancel in the sum. See docs/strategies.md for the choice.
    """

    name = "fedavg"

    def __init__(self, precision: Literal["float32", "float64"] = "float32") -> None:
        super().__init__()
        if precision not in ("float32", "float64"):
            raise ConfigError(f"accumulator precision must be float32 or float64, got {precision!r}")
        self.precision = precision
        self._acc: Params | None = None
        self._totals: dict[int, float] = {}
        self._scratch: np.ndarray | None = None
        # (tensor, [(weight key, slice, flat view of the accumulator)]): see _alloc
        self._plan: list[tuple[str, list[tuple[int, slice | None, np.ndarray]]]] = []

    # segments: (weight key, slice along dim 0 or None); FedAvg has one key for everything
    def _segments(self, name: str) -> list[tuple[int, slice | None]]:
        return [(0, None)]

    def _weights(self, fog_id: str, num_samples: int, meta: Mapping) -> dict[int, float]:
        return {0: float(num_samples)}

    def _reset(self) -> None:
        self._acc = None
        self._plan = []
        self._totals = {}
        self._scratch = None

    def _alloc(self, masked: bool) -> None:
        dtype = np.float64 if (masked or self.precision == "float64") else np.float32
        self._acc = {k: np.zeros(g.shape, dtype=dtype) for k, g in self._global.items()}
        # each tensor's segments as flat views of the accumulator, worked out once a round rather
        # than per update (the bookkeeping per update was ~20 us, 5 % of folding a 2 M model)
        self._plan = [(name, [(key, sl, (acc if sl is None else acc[sl]).reshape(-1))
                              for key, sl in self._segments(name)])
                      for name, acc in self._acc.items()]
        if dtype == np.float64:
            self._scratch = np.empty(_CHUNK, dtype=np.float64)

    def _add(self, fog_id: str, update: Mapping[str, np.ndarray], num_samples: int, masked: bool,
             meta: Mapping) -> None:
        if self._acc is None:
            self._alloc(masked)
        assert self._acc is not None
        if masked:  # pre-multiplied by num_samples: plain sum, divided by the total samples at the end
            weights = dict.fromkeys(self._weight_keys(), 1.0)
            for key in weights:
                self._totals[key] = self._totals.get(key, 0.0) + num_samples
        else:
            weights = self._weights(fog_id, num_samples, meta)
            for key, w in weights.items():
                self._totals[key] = self._totals.get(key, 0.0) + w
        f32 = next(iter(self._acc.values())).dtype == np.float32  # the accumulator's dtype, per round
        with one_blas_thread():
            for name, segments in self._plan:
                u = update[name]
                flags = u.flags  # a new flags object at each access
                if u.dtype != np.float32 or not flags.c_contiguous:
                    u = _f32(u)
                    flags = u.flags
                direct = f32 and flags.aligned
                for key, sl, y in segments:
                    w = weights[key]
                    if w == 0.0:
                        continue
                    x = (u if sl is None else u[sl]).reshape(-1)
                    if not x.size:
                        continue
                    if direct:  # the common case, inline: ~1 us per tensor less than a method call
                        r = saxpy(x, y, a=w)
                        if r is not y:  # pragma: no cover - f2py wrote a copy (non-contiguous y); never seen
                            y[...] = r
                    else:
                        self._axpy_scratch(y, x, w)

    def _weight_keys(self) -> list[int]:
        return [0]

    def _axpy_scratch(self, y: np.ndarray, x: np.ndarray, w: float) -> None:
        """y += w * x in place (y and x flat, contiguous, the same size) for a float64 accumulator or
        an unaligned view into a received payload (BLAS wrappers would silently copy the whole
        tensor): through a small aligned scratch of the accumulator's dtype."""
        s = self._scratch
        if s is None or s.dtype != y.dtype:
            s = self._scratch = np.empty(_CHUNK, dtype=y.dtype)
        axpy = saxpy if y.dtype == np.float32 else daxpy
        for i in range(0, x.size, _CHUNK):
            j = min(x.size, i + _CHUNK)
            buf = s[: j - i]
            np.copyto(buf, x[i:j])
            axpy(buf, y[i:j], a=w)

    def _finish(self, server_lr: float) -> Params:
        """global + mean (delta) or global - server_lr * mean (gradient), made in the accumulator:
        one scaling pass (the division by the total and the server learning rate together) and one
        addition of the global model, BLAS on the calling thread for a float32 accumulator
        (~0.2 ms for a 2 M model against ~0.3 ms with NumPy's in-place multiply and add)."""
        acc = self._acc
        assert acc is not None
        factor = -server_lr if self._kind == "gradient" else 1.0
        out: Params = {}
        with one_blas_thread():
            for name in list(acc):
                a = acc.pop(name)
                for key, sl in self._segments(name):
                    view = a if sl is None else a[sl]
                    total = self._totals.get(key, 0.0)
                    if total > 0:
                        _scale(view, factor / total)
                    else:  # nobody trained this part: it keeps its global value
                        view[...] = 0
                _add_into(a, self._global[name])
                out[name] = a if a.dtype == np.float32 else a.astype(np.float32)
                del a
        return out


def _blas_ready(*arrays: np.ndarray) -> bool:
    """float32, C-contiguous and aligned: a BLAS wrapper works on them in place, no copy."""
    return all(a.dtype == np.float32 and a.flags.c_contiguous and a.flags.aligned for a in arrays)


def _scale(view: np.ndarray, f: float) -> None:
    """view *= f in place."""
    if _blas_ready(view):
        sscal(f, view.reshape(-1))
    else:
        np.multiply(view, f, out=view)


def _add_into(a: np.ndarray, g: np.ndarray) -> None:
    """a += g in place (g cast to a's dtype)."""
    if _blas_ready(a, g):
        saxpy(g.reshape(-1), a.reshape(-1), a=1.0)
    else:
        np.add(a, g, out=a)


class FedProx(FedAvg):
    """FedAvg aggregation; the fogs add (mu/2)·||w - w_global||² to their local loss."""

    name = "fedprox"

    def __init__(self, mu: float = DEFAULT_PROX_MU, precision: Literal["float32", "float64"] = "float32") -> None:
        super().__init__(precision)
        if mu < 0:
            raise ConfigError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu or DEFAULT_PROX_MU

    def configure(self, round_: int, train: TrainConfig) -> TrainConfig:
        return train.model_copy(update={"prox_mu": self.mu})


class Fed2(FedAvg):
    """Feature-paired averaging over the Fed2 architecture (kernel/fed2.py).

    Shared layers: sample-weighted mean, as FedAvg. Group j's parameters (whole tensors, or slices
    along dim 0 of the grouped convolutions) are averaged only with group j of the other fogs.
    ``weighting`` says how each fog counts for group j:

    - ``"samples"`` (default): by num_samples. The structure is aligned, so this pairs group j
      with group j coordinate-wise; it is FedAvg on the Fed2 net.
    - ``"classes"``: by its samples of group j's classes (``meta["label_counts"]``), plus
      ``smoothing`` × num_samples / G. A fog that sends no counts is weighted by its sample count;
      a group no fog has samples of keeps its global value this round.
    - ``"features"``: group j's feature filters (its slices of the grouped convolutions) as
      ``"classes"``, group j's head by num_samples: the heads' logits are calibrated against each
      other only by the fogs that lack a group's classes.

    docs/strategies.md has the measurements behind the default: ``"classes"`` loses the
    calibration between the groups' logits and collapses under strong label skew.

    Masked updates carry no per-class weight: they are averaged as FedAvg.
    """

    name = "fed2"

    def __init__(self, precision: Literal["float32", "float64"] = "float32",
                 weighting: Literal["samples", "classes", "features"] = "samples", smoothing: float = 0.0) -> None:
        super().__init__(precision)
        if weighting not in ("classes", "features", "samples"):
            raise ConfigError(f"fed2 weighting must be classes, features or samples, got {weighting!r}")
        if smoothing < 0:
            raise ConfigError(f"fed2 smoothing must be >= 0, got {smoothing}")
        self.weighting = weighting
        self.smoothing = smoothing
        self._groups: dict[str, list[tuple[int, slice | None]]] = {}
        self._classes: list[list[int]] = []
        self._shared_key = -1


    def configure(self, round_: int, train: TrainConfig) -> TrainConfig:
        """Class-weighted variants need the fogs' per-class counts; the default does not ask."""
        return train.model_copy(update={"report_label_counts": self.weighting != "samples"})
    def begin_round(self, global_params: Mapping[str, np.ndarray], spec: dict) -> None:
        if spec.get("arch") != "fed2":
            raise ConfigError(f"strategy fed2 needs model.arch=fed2, the model is {spec.get('arch')!r}")
        from kernel.fed2 import GROUPED_CONVS, SHARED, fed2_class_groups, fed2_param_groups

        groups = fed2_param_groups(spec)
        if set(groups) != set(global_params):
            raise ConfigError("strategy fed2: the global parameters do not match the fed2 architecture's")
        self._shared_key = SHARED
        if self.weighting == "samples":
            groups = {k: [(SHARED, None)] for k in groups}
        elif self.weighting == "features":
            groups = {k: (v if k.startswith(GROUPED_CONVS) else [(SHARED, None)]) for k, v in groups.items()}
        self._groups = groups
        self._classes = fed2_class_groups(spec)
        super().begin_round(global_params, spec)

    def _segments(self, name: str) -> list[tuple[int, slice | None]]:
        return self._groups[name]

    def _weight_keys(self) -> list[int]:
        return [self._shared_key, *range(len(self._classes))]

    def _weights(self, fog_id: str, num_samples: int, meta: Mapping) -> dict[int, float]:
        counts = _label_counts(meta.get("label_counts"))
        w: dict[int, float] = {self._shared_key: float(num_samples)}
        g = len(self._classes)
        for j, classes in enumerate(self._classes):
            w[j] = float(sum(counts.get(c, 0) for c in classes)) if counts else float(num_samples)
            w[j] += self.smoothing * num_samples / g
        if not counts:
            log.debug("fed2: %s sent no label counts; its groups are weighted by its %d samples", fog_id,
                      num_samples)
        return w

    def admit(self, fog_id: str, update: Mapping[str, np.ndarray], num_samples: int, kind: str,
              meta: Mapping | None = None) -> Admitted:
        admitted = super().admit(fog_id, update, num_samples, kind, meta)
        if admitted.masked and len(self._fogs) == 1:
            log.warning("fed2: masked updates carry no per-class weights; groups are averaged as FedAvg")
        return admitted


def _label_counts(raw) -> dict[int, int]:
    if not raw:
        return {}
    try:
        return {int(k): int(v) for k, v in dict(raw).items()}
    except (TypeError, ValueError):
        raise AggregationError("label_counts must map class ids to counts") from None


class _Robust(Strategy):
    """Holds every update of the round (references, no copies) until ``end_round``: extra memory is
    n models, plus one tensor stacked over the n fogs at a time while aggregating."""

    def __init__(self) -> None:
        super().__init__()
        self._updates: dict[str, Params] = {}

    def _reset(self) -> None:
        self._updates = {}

    def _add(self, fog_id: str, update: Mapping[str, np.ndarray], num_samples: int, masked: bool,
             meta: Mapping) -> None:
        if masked:
            raise AggregationError(f"{self.name} cannot aggregate masked updates: masks cancel only in the "
                                   "plain sum; use strategy fedavg with defense.masking")
        self._updates[fog_id] = {k: _f32(v) for k, v in update.items()}

    def _ordered(self) -> list[Params]:
        return [self._updates[f] for f in sorted(self._updates)]  # arrival order must not matter

    def _finish(self, server_lr: float) -> Params:
        ups = self._ordered()
        agg = {}
        for name in self._global:
            stack = np.stack([u[name] for u in ups])
            agg[name] = self._reduce(stack)
            del stack
        return self._new_params(agg, server_lr)

    def _reduce(self, stack: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Median(_Robust):
    """Coordinate-wise median (unweighted: a sample count is the attacker's to claim)."""

    name = "median"

    def _reduce(self, stack: np.ndarray) -> np.ndarray:
        return np.median(stack, axis=0)


class TrimmedMean(_Robust):
    """Coordinate-wise mean after dropping the floor(trim_ratio·n) largest and smallest values."""

    name = "trimmed_mean"

    def __init__(self, trim_ratio: float = 0.2) -> None:
        super().__init__()
        if not 0 <= trim_ratio < 0.5:
            raise ConfigError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
        self.trim_ratio = trim_ratio

    def _reduce(self, stack: np.ndarray) -> np.ndarray:
        n = stack.shape[0]
        k = min(int(math.floor(self.trim_ratio * n)), (n - 1) // 2)
        if k == 0:
            return stack.mean(axis=0, dtype=np.float64)
        s = np.sort(stack, axis=0)
        return s[k : n - k].mean(axis=0, dtype=np.float64)


class Krum(_Robust):
    """Krum (Blanchard et al. 2017): the update with the smallest sum of squared distances to its
    n - f - 2 nearest neighbours. Needs n > 2f + 2; with fewer updates it falls back to the
    coordinate-wise median (logged). ``multi`` > 1 is Multi-Krum (El Mhamdi et al. 2018): the
    plain mean of the ``multi`` best-scored updates (capped at n - f)."""

    name = "krum"

    def __init__(self, faulty: int = 2, multi: int = 1) -> None:
        super().__init__()
        if faulty < 0:
            raise ConfigError(f"krum_faulty must be >= 0, got {faulty}")
        if multi < 1:
            raise ConfigError(f"multi-krum needs multi >= 1, got {multi}")
        self.faulty = faulty
        self.multi = multi
        self.last_choice: list[str] = []

    def scores(self, ups: list[Params]) -> np.ndarray:
        n = len(ups)
        d = np.zeros((n, n), dtype=np.float64)
        for name in self._global:
            x = np.stack([u[name].reshape(-1) for u in ups]).astype(np.float64)
            sq = np.einsum("ij,ij->i", x, x)
            d += sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
            del x
        np.maximum(d, 0.0, out=d)
        m = n - self.faulty - 2
        out = np.empty(n)
        for i in range(n):
            others = np.delete(d[i], i)
            out[i] = np.sort(others)[:m].sum()
        return out

    def _finish(self, server_lr: float) -> Params:
        n = len(self._updates)
        if n <= 2 * self.faulty + 2:
            log.warning("krum: %d updates <= 2f+2 = %d (f=%d); falling back to the coordinate-wise median",
                        n, 2 * self.faulty + 2, self.faulty)
            self.last_choice = []
            agg = {name: np.median(np.stack([u[name] for u in self._ordered()]), axis=0) for name in self._global}
            return self._new_params(agg, server_lr)
        ids = sorted(self._updates)
        ups = [self._updates[f] for f in ids]
        m = min(self.multi, n - self.faulty)
        best = np.argsort(self.scores(ups), kind="stable")[:m]
        self.last_choice = [ids[i] for i in best]
        log.info("krum: chose the update(s) of %s", ", ".join(self.last_choice))
        if m == 1:
            return self._new_params(ups[int(best[0])], server_lr)
        agg = {name: np.mean(np.stack([ups[i][name] for i in best]), axis=0, dtype=np.float64)
               for name in self._global}
        return self._new_params(agg, server_lr)


def make_strategy(cfg: CloudConfig, train: TrainConfig) -> Strategy:
    """The strategy named by ``cfg.strategy``."""
    name = cfg.strategy
    if name == "fedavg":
        return FedAvg()
    if name == "fedprox":
        return FedProx(mu=train.prox_mu or DEFAULT_PROX_MU)
    if name == "fed2":
        return Fed2(weighting=cfg.fed2_weighting)
    if name == "median":
        return Median()
    if name == "trimmed_mean":
        return TrimmedMean(cfg.trim_ratio)
    if name == "krum":
        return Krum(cfg.krum_faulty, multi=cfg.krum_multi)
    raise ConfigError(f"unknown strategy {name!r} (fedavg, fedprox, fed2, median, trimmed_mean, krum)")
