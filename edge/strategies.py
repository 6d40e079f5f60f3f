"""Query strategies: small functions ``(classifier, X, n, rng) -> (indices, scores)``.

``X`` is the candidate pool (n_pool, C, H, W) (flat rows work too), ``n`` how many to pick, ``rng``
a numpy Generator (the only source of randomness, so a query is deterministic given it).
``indices`` index ``X``, best first; ``scores`` are the strategy's own scores of the picks:

- ``random``: uniform without replacement (the baseline); scores are 0 (it scores nothing).
- ``uncertainty``: least confident, 1 - max p (higher = more informative).
- ``margin``: smallest gap between the two most likely classes (lower = more informative).
- ``entropy``: maximum predictive entropy, in nats (higher = more informative); the acquisition
  function of Qian et al. (arXiv:1906.10718).
- ``ranked-batch``: Cardoso et al.'s ranked batch-mode sampling (uncertainty balanced against
  distance to what is already labelled); scores are the picks' uncertainty, in rank order.
  Strategies accept ``labeled`` (flat rows the edge has already sent): ranked-batch uses it as its
  labelled set, or cold-starts when it is empty (the cold start is done here with modAL's
  ``select_cold_start_instance``, because modAL 0.4.2.1 can pick its cold-start sample twice).

The scoring comes from modAL-python 0.4.2.1 (``modAL.uncertainty``, ``modAL.batch``); only its
strategy functions are used (its ActiveLearner.fit/teach break on scikit-learn >= 1.8).
:func:`query` adds candidate subsetting (score a random ``subset`` of the pool, 0 = the whole
pool, as in the digest's random 200-image subset) and the name registry.

modAL is imported lazily (:func:`preload`), because ``modAL.utils.data`` does ``import torch``
when torch happens to be installed; the edge promises never to load torch, so the import runs
with torch hidden (exactly what a Raspberry Pi without torch sees). If torch is already loaded
in the process (tests, the in-process engine), nothing is hidden.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

from kernel.errors import ConfigError

log = logging.getLogger(__name__)

Strategy = Callable[..., tuple[np.ndarray, np.ndarray]]
STRATEGIES: dict[str, Strategy] = {}

# ranked-batch computes pairwise distances among its candidates (a cold start is n^2); above
# this many candidates it works on a random subset of this size (32 MB of distances).
RANKED_BATCH_MAX_CANDIDATES = 2048

_modal: SimpleNamespace | None = None
_modal_lock = threading.Lock()


def preload() -> SimpleNamespace:
    """Import modAL's strategy modules (once), keeping torch out of ``sys.modules``."""
    global _modal
    with _modal_lock:
        if _modal is None:
            # modAL's own dependencies first, imported normally (none of them imports torch).
            import pandas  # noqa: F401  (modAL.utils.data imports it)
            import scipy.stats  # noqa: F401
            import sklearn.metrics.pairwise  # noqa: F401

            hide = "torch" not in sys.modules
            if hide:
                sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail fast
            try:
                import modAL.batch as batch
                import modAL.uncertainty as uncertainty
            finally:
                if hide and "torch" in sys.modules and sys.modules["torch"] is None:
                    del sys.modules["torch"]
            from threadpoolctl import ThreadpoolController

            # sklearn's pairwise reductions use OpenMP; on a busy (or tiny) machine its spinning
            # worker threads cost ~100x on pool-sized inputs, so queries run with few threads.
            _modal = SimpleNamespace(uncertainty=uncertainty, batch=batch, threads=ThreadpoolController())
    return _modal


def register(name: str) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return deco


def names() -> list[str]:
    return list(STRATEGIES)


def _flat(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X.reshape(len(X), -1)


def _ranked(idx: np.ndarray, scores: np.ndarray, higher_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """Order picks best first (ties by index, so the order is deterministic)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    key = -scores if higher_is_better else scores
    order = np.lexsort((idx, key))
    return idx[order], scores[order]


@register("random")
def random_query(classifier: Any, X: np.ndarray, n: int, rng: np.random.Generator,
                 labeled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.choice(len(X), size=n, replace=False).astype(np.int64)
    return idx, np.zeros(n, dtype=np.float64)


@register("uncertainty")
def uncertainty_query(classifier: Any, X: np.ndarray, n: int, rng: np.random.Generator,
                      labeled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    idx, scores = preload().uncertainty.uncertainty_sampling(classifier, X, n_instances=n)
    return _ranked(idx, scores, higher_is_better=True)


@register("margin")
def margin_query(classifier: Any, X: np.ndarray, n: int, rng: np.random.Generator,
                 labeled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    idx, scores = preload().uncertainty.margin_sampling(classifier, X, n_instances=n)
    return _ranked(idx, scores, higher_is_better=False)


@register("entropy")
def entropy_query(classifier: Any, X: np.ndarray, n: int, rng: np.random.Generator,
                  labeled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    idx, scores = preload().uncertainty.entropy_sampling(classifier, X, n_instances=n)
    return _ranked(idx, scores, higher_is_better=True)


class _LearnerView:
    """What modAL's ranked batch needs from a learner: predict_proba, the labelled rows
    (``X_training``, None for a cold start) and ``on_transformed``."""

    on_transformed = False

    def __init__(self, classifier: Any, labeled: np.ndarray | None) -> None:
        self._classifier = classifier
        self.X_training = None if labeled is None or len(labeled) == 0 else _flat(labeled)

    def predict_proba(self, X: np.ndarray, **kwargs: Any) -> np.ndarray:
        return self._classifier.predict_proba(X, **kwargs)


@register("ranked-batch")
def ranked_batch_query(classifier: Any, X: np.ndarray, n: int, rng: np.random.Generator,
                       labeled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    flat = _flat(X)
    cand = np.arange(len(flat))
    if len(flat) > RANKED_BATCH_MAX_CANDIDATES:
        log.info("ranked-batch: scoring a random %d of %d candidates (distance matrix bound)",
                 RANKED_BATCH_MAX_CANDIDATES, len(flat))
        cand = np.sort(rng.choice(len(flat), size=RANKED_BATCH_MAX_CANDIDATES, replace=False))
    modal = preload()
    learner = _LearnerView(classifier, labeled)
    x = flat[cand]
    unc = np.asarray(modal.uncertainty.classifier_uncertainty(learner, x), dtype=np.float64)
    picked: list[int] = []
    if learner.X_training is None:
        # modAL 0.4.2.1's cold start leaves its first pick in the pool, so the batch can name it
        # twice; do the cold start here (with modAL's function) and rank the rest without it.
        first, _ = modal.batch.select_cold_start_instance(x, "euclidean", None)
        picked = [int(first)]
        learner.X_training = x[[int(first)]]
    rest = np.setdiff1d(np.arange(len(x)), picked)
    if n > len(picked) and len(rest):
        idx, _ = modal.batch.ranked_batch(learner, unlabeled=x[rest], uncertainty_scores=unc[rest],
                                          n_instances=n - len(picked), metric="euclidean", n_jobs=None)
        picked += rest[np.asarray(idx, dtype=np.int64)].tolist()
    chosen = np.asarray(picked, dtype=np.int64)
    return cand[chosen], unc[chosen]


def canonical(name: str) -> str:
    """The registered name for ``name`` (case and '_' vs '-' do not matter), or ConfigError."""
    key = name.strip().lower().replace("_", "-")
    if key not in STRATEGIES:
        raise ConfigError(f"unknown query strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}")
    return key


def query(
    name: str,
    classifier: Any,
    X: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    subset: int = 0,
    candidates: np.ndarray | None = None,
    labeled: np.ndarray | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick up to ``n`` samples of ``X`` with strategy ``name``.

    ``candidates`` (indices into ``X``, default all rows) restricts the pool without copying
    ``X``. With ``0 < subset < len(candidates)`` only a random ``subset`` of them is scored (drawn
    from ``rng`` first). Returns (indices into ``X``, scores), best first; fewer than ``n`` when
    the pool (or subset) is smaller. BLAS / OpenMP run with at most ``threads`` threads meanwhile
    (onnxruntime has its own setting, see OnnxClassifier).
    """
    fn = STRATEGIES[canonical(name)]
    if subset < 0:
        raise ConfigError(f"acquisition subset must be >= 0, got {subset}")
    cand = (np.arange(len(X), dtype=np.int64) if candidates is None
            else np.asarray(candidates, dtype=np.int64).reshape(-1))
    if 0 < subset < len(cand):
        cand = cand[np.sort(rng.choice(len(cand), size=subset, replace=False))]
    n = min(int(n), len(cand))
    if n <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    pool = X if candidates is None and len(cand) == len(X) else X[cand]
    with preload().threads.limit(limits=max(1, int(threads))):
        idx, scores = fn(classifier, pool, n, rng, labeled=labeled)
    return cand[np.asarray(idx, dtype=np.int64)], np.asarray(scores, dtype=np.float64)
