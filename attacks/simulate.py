"""Differentiable re-enactment of what the fog computed, for gradient-matching attacks.

Given a capture, :func:`load_victim` rebuilds the served model (``kernel.models.build_model`` on
``capture.arch``, parameters from ``capture.served``), and :func:`simulate` computes, as a
differentiable function of dummy inputs (and dummy labels), the same kind of update the fog sent:

- ``gradient`` captures: the gradient of the mean cross-entropy over the whole batch
  (``fog.trainer``'s FedSGD update);
- ``delta`` captures: ``w_local - w_served`` after the captured number of local optimiser steps
  (SGD with momentum, optionally FedProx, or Adam with torch's defaults), each step on the
  mini-batch the trainer would have used. Parameters are threaded through the steps with
  ``torch.func.functional_call``, so the whole trajectory stays in the autograd graph.

Batch composition: without shuffling the trainer walks the samples in order, so step ``k`` uses
dummy samples ``[k*bs, (k+1)*bs)`` (the dummy batch has no intrinsic order, so this is exact).
Within the first epoch a shuffle changes nothing for the attacker either: it only decides which
samples fall into which batch, and the dummy samples are exchangeable. Once a shuffled run goes
past one epoch with ``batch_size < num_samples``, the later batches mix the samples in a way set
by the fog's private seed; :func:`schedule` then raises :class:`~attacks.base.AttackError`, or,
with ``assume_full_batch=True``, simulates every step on the whole batch (an approximation whose
error grows with the number of steps and the learning rate).

The matched quantity is the *pseudo-gradient*: the gradient itself for ``gradient`` captures and
``-delta / lr`` for ``delta`` captures (for one plain-SGD step this is exactly the gradient of the
batch that step used), so distances keep the same scale whatever the update kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from attacks.base import AttackError
from kernel.errors import ModelError
from kernel.models import build_model
from protos.capture import Capture

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class SimSpec:
    """What the fog did locally, as read from the capture header."""

    kind: str  # "gradient" | "delta"
    num_samples: int
    lr: float = 1.0
    epochs: int = 1
    steps: int = 1
    batch_size: int = 1
    optimizer: str = "sgd"
    momentum: float = 0.0
    prox_mu: float = 0.0
    shuffle: bool = False

    @classmethod
    def from_capture(cls, capture: Capture) -> SimSpec:
        hp = capture.hparams
        kind = capture.kind
        if kind not in ("gradient", "delta"):
            raise AttackError(f"capture has update kind {kind!r}; gradient-matching attacks need "
                              "'gradient' or 'delta'")
        n = capture.num_samples
        if n <= 0:
            raise AttackError("capture header has num_samples = 0; cannot size the dummy batch")
        bs = int(hp.batch_size) or n
        return cls(kind=kind, num_samples=n, lr=float(hp.lr) or 1.0, epochs=max(int(hp.epochs), 1),
                   steps=int(hp.steps), batch_size=min(bs, n), optimizer=hp.optimizer or "sgd",
                   momentum=float(hp.momentum), prox_mu=float(hp.prox_mu), shuffle=bool(hp.shuffle))

    @property
    def single_sgd_step(self) -> bool:
        """A delta that is exactly ``-lr * gradient`` of its first batch."""
        return self.kind == "delta" and self.steps == 1 and self.optimizer == "sgd"


def schedule(spec: SimSpec, assume_full_batch: bool = False) -> list[slice]:
    """The sample slice each local step trained on (``[slice(0, n)]`` for gradient captures)."""
    n = spec.num_samples
    if spec.kind == "gradient":
        return [slice(0, n)]
    bs = spec.batch_size
    per_epoch = math.ceil(n / bs)
    steps = spec.steps if spec.steps > 0 else spec.epochs * per_epoch
    # Within the first epoch a shuffle only permutes which samples land in which batch, and the
    # dummy samples are exchangeable, so in-order slices are exact. A second epoch re-shuffles.
    if spec.shuffle and bs < n and steps > per_epoch:
        if not assume_full_batch:
            raise AttackError(f"shuffled mini-batches ({bs} of {n} samples, {steps} steps over several epochs) "
                              "have an unknown composition; pass assume_full_batch=True to approximate")
        bs, per_epoch = n, 1
    out: list[slice] = []
    while len(out) < steps:
        for start in range(0, n, bs):
            out.append(slice(start, min(start + bs, n)))
            if len(out) == steps:
                break
    return out


def momentum_scale(spec: SimSpec) -> float:
    """How many gradients' worth of displacement ``steps`` local steps make if every step saw the
    same gradient (SGD with momentum: sum over t of (1 - m^(t+1)) / (1 - m)). Used to put
    ``-delta/lr`` back on a per-gradient scale for label counting."""
    if spec.kind == "gradient":
        return 1.0
    steps = max(spec.steps, 1)
    m = spec.momentum if spec.optimizer == "sgd" else 0.0
    if m <= 0:
        return float(steps)
    return float(sum((1 - m ** (t + 1)) / (1 - m) for t in range(steps)))


class Victim:
    """The served model as a pure function of its parameters."""

    def __init__(self, capture: Capture, dtype: torch.dtype = torch.float32) -> None:
        try:
            self.model: nn.Module = build_model(capture.arch)
        except (ModelError, KeyError, TypeError) as exc:
            raise AttackError(f"cannot rebuild the served model from the capture's arch spec: {exc}") from None
        self.model = self.model.to(dtype)
        self.model.train()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.names = [k for k, _ in self.model.named_parameters()]
        missing = [k for k in self.names if k not in capture.served or k not in capture.update]
        if missing:
            raise AttackError(f"capture lacks parameters {missing[:3]} of its architecture")
        self.dtype = dtype
        self.params = [torch.as_tensor(np.asarray(capture.served[k]), dtype=dtype) for k in self.names]
        for k, p in zip(self.names, self.params, strict=True):
            if tuple(p.shape) != tuple(dict(self.model.named_parameters())[k].shape):
                raise AttackError(f"served parameter {k} has shape {tuple(p.shape)}, the architecture wants "
                                  f"{tuple(dict(self.model.named_parameters())[k].shape)}")
        self.in_shape = tuple(int(v) for v in capture.arch["in_shape"])
        self.num_classes = int(capture.arch["num_classes"])

    def logits(self, params: list[Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, dict(zip(self.names, params, strict=True)), (x,))

    def loss(self, params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy; ``y`` is either class indices (B,) or label logits (B, K) whose
        softmax is the soft label (DLG's joint label)."""
        out = self.logits(params, x)
        if y.dtype in (torch.int64, torch.int32):
            return nn.functional.cross_entropy(out, y)
        return -(torch.softmax(y, dim=-1) * torch.log_softmax(out, dim=-1)).sum(dim=-1).mean()

    def grad(self, params: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
        ps = [p if p.requires_grad else p.detach().requires_grad_(True) for p in params]
        return list(torch.autograd.grad(self.loss(ps, x, y), ps, create_graph=True))


def simulate(victim: Victim, spec: SimSpec, x: Tensor, y: Tensor, batches: list[slice]) -> list[Tensor]:
    """The pseudo-gradient the fog would have sent had it trained on (x, y); differentiable."""
    if spec.kind == "gradient" or spec.single_sgd_step:
        sl = batches[0]
        return victim.grad(victim.params, x[sl], y[sl])
    p0 = [p.detach().requires_grad_(True) for p in victim.params]
    params = list(p0)
    bufs: list[Tensor] | None = None
    m_adam: list[Tensor] = []
    v_adam: list[Tensor] = []
    b1, b2 = ADAM_BETAS
    for t, sl in enumerate(batches, start=1):
        g = victim.grad(params, x[sl], y[sl])
        if spec.prox_mu > 0:
            g = [gi + spec.prox_mu * (p - q) for gi, p, q in zip(g, params, p0, strict=True)]
        if spec.optimizer == "adam":
            if not m_adam:
                m_adam = [torch.zeros_like(gi) for gi in g]
                v_adam = [torch.zeros_like(gi) for gi in g]
            m_adam = [b1 * m + (1 - b1) * gi for m, gi in zip(m_adam, g, strict=True)]
            v_adam = [b2 * v + (1 - b2) * gi * gi for v, gi in zip(v_adam, g, strict=True)]
            c1, c2 = 1 - b1**t, 1 - b2**t
            # sqrt(v + tiny): same value as torch's Adam, but a finite derivative where v == 0
            params = [p - spec.lr * (m / c1) / (torch.sqrt(v / c2 + 1e-30) + ADAM_EPS)
                      for p, m, v in zip(params, m_adam, v_adam, strict=True)]
        else:
            if spec.momentum > 0:
                bufs = list(g) if bufs is None else [spec.momentum * b + gi for b, gi in zip(bufs, g, strict=True)]
                step = bufs
            else:
                step = g
            params = [p - spec.lr * s for p, s in zip(params, step, strict=True)]
    return [(q - p) / spec.lr for p, q in zip(params, p0, strict=True)]


def target_update(victim: Victim, spec: SimSpec, capture: Capture) -> list[Tensor]:
    """The captured update on the same pseudo-gradient scale as :func:`simulate`."""
    ts = [torch.as_tensor(np.asarray(capture.update[k]), dtype=victim.dtype) for k in victim.names]
    if spec.kind == "gradient":
        return ts
    return [-t / spec.lr for t in ts]


def dummy_batch_size(spec: SimSpec, batches: list[slice]) -> int:
    """Samples the matched update depends on: all of them, except for a single step that saw
    only its first mini-batch."""
    if spec.kind == "delta" and len(batches) == 1:
        sl = batches[0]
        return sl.stop - sl.start
    return spec.num_samples
