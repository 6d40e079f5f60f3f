"""Small torch helpers shared by the attacks (kept small and stable: other attack modules import it).

- :func:`served_model` rebuilds the victim's model from a capture (``capture.arch``) with the
  parameters the fog was served.
- :func:`observed_gradient` turns a capture's update into the gradient of the fog's mean loss at the
  served parameters, when that is exactly recoverable (a ``gradient`` update, or a ``delta`` from a
  single plain-SGD step: the first SGD step, with or without momentum, moves by ``-lr * grad``, and a
  FedProx term has zero gradient at the served point). Anything else raises :class:`AttackError`.
- :func:`batch_size_of` is the number of samples behind that gradient.
- :func:`linear_layers` / :func:`first_param_layer` locate layers structurally (module order of
  the rebuilt model), never by hard-coded parameter names.
- :func:`one_thread` runs a block on one intra-op thread (tiny models' many small ops run far
  slower with threads on a shared machine).
- :func:`infer_labels` recovers the batch's labels from the last layer's bias gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attacks.base import AttackError
from kernel.models import build_model, set_params
from protos.capture import Capture


def served_model(capture: Capture, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The victim's architecture with the served parameters, in eval mode (no dropout/bn here)."""
    model = build_model(capture.arch)
    set_params(model, capture.served)
    return model.to(dtype).eval()


def is_single_step(capture: Capture) -> bool:
    hp = capture.hparams
    if capture.kind == "gradient":
        return True
    return capture.kind == "delta" and int(hp.steps) == 1 and (hp.optimizer or "sgd") == "sgd" and hp.lr > 0


def observed_gradient(capture: Capture) -> dict[str, np.ndarray]:
    """Gradient of the fog's mean loss at the served parameters (float64), name -> array."""
    hp = capture.hparams
    if capture.kind == "gradient":
        return {k: np.asarray(v, dtype=np.float64) for k, v in capture.update.items()}
    if capture.kind == "delta":
        if (hp.optimizer or "sgd") != "sgd":
            raise AttackError(f"update is a delta from optimizer {hp.optimizer!r}; this attack needs a gradient "
                              "or a single plain-SGD step (ask the fog for update_kind=gradient)")
        if int(hp.steps) != 1:
            raise AttackError(f"update is a delta of {hp.steps} local steps; this attack needs a gradient or a "
                              "single SGD step (set train.max_steps=1 or update_kind=gradient)")
        if not hp.lr > 0:
            raise AttackError("delta update without a positive learning rate in its header; cannot undo the step")
        return {k: -np.asarray(v, dtype=np.float64) / float(hp.lr) for k, v in capture.update.items()}
    raise AttackError(f"unknown update kind {capture.kind!r}")


def batch_size_of(capture: Capture) -> int:
    """Samples behind the observed gradient: all of them for a gradient, one mini-batch for a step."""
    n = max(int(capture.num_samples), 1)
    if capture.kind == "delta" and int(capture.hparams.batch_size) > 0:
        return min(n, int(capture.hparams.batch_size))
    return n


@dataclass(frozen=True)
class LayerRef:
    index: int  # position in the flat module order (model.modules() leaves)
    module: nn.Module
    weight: str  # parameter names in named_parameters order
    bias: str | None


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if not list(m.children())]


def _ref(i: int, name: str, m: nn.Module) -> LayerRef:
    pre = f"{name}." if name else ""
    return LayerRef(i, m, pre + "weight", pre + "bias" if getattr(m, "bias", None) is not None else None)


def first_param_layer(model: nn.Module) -> LayerRef:
    for i, (name, m) in enumerate(_leaves(model)):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return _ref(i, name, m)
    raise AttackError("the model has no linear or convolutional layer")


def linear_layers(model: nn.Module) -> list[LayerRef]:
    return [_ref(i, name, m) for i, (name, m) in enumerate(_leaves(model)) if isinstance(m, nn.Linear)]


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in _leaves(model)]


def infer_labels(last_bias_grad: np.ndarray, batch: int) -> np.ndarray:
    """Labels from the last layer's bias gradient of a mean softmax cross-entropy.

    ``g_c = mean_n(p_nc) - N_c / B``: a class in the batch has a negative entry (unless the model is
    already confident about it). For absent classes ``g_c = mean_n(p_nc)``, so their mean estimates
    the average probability ``p̄`` of the present classes too; counts are ``N_c ≈ B·(p̄ - g_c)``,
    rounded by largest remainder to sum to ``B`` with every negative class at least once.
    Returns a sorted label vector of length ``batch`` (order is meaningless for a batch)."""
    g = np.asarray(last_bias_grad, dtype=np.float64)
    k = g.size
    neg = g < 0
    if batch <= 1:
        return np.array([int(np.argmin(g))], dtype=np.int64)
    pbar = float(g[~neg].mean()) if (~neg).any() else 1.0 / k
    est = np.clip(batch * (pbar - g), 0.0, None)
    counts = np.floor(est).astype(int)
    counts[neg & (counts == 0)] = 1
    floor_ = neg.astype(int) if neg.sum() <= batch else np.zeros(k, dtype=int)
    while counts.sum() > batch:  # too many: take one from the largest overshoot
        i = int(np.argmax(np.where(counts > floor_, counts - est, -np.inf)))
        counts[i] -= 1
    rema = est - counts
    while counts.sum() < batch:
        i = int(np.argmax(rema))
        counts[i] += 1
        rema[i] -= 1.0
    return np.repeat(np.arange(k), counts).astype(np.int64)


def to_tensor(x: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


@contextmanager
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
