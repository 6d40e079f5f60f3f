"""Local training at the fog: the function that turns (served model, pooled samples, round
config) into the update the fog uploads.

- ``update_kind="gradient"``: one gradient of the mean cross-entropy over all the samples
  (FedSGD); no parameter changes locally.
- ``update_kind="delta"``: ``local_epochs`` epochs of mini-batch SGD (momentum) or Adam, at most
  ``max_steps`` steps if set, with an optional FedProx term (mu/2)·||w - w_global||²; the update is
  ``w_local - w_served``.
Deterministic for a given ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kernel.models import build_model, get_params, set_params
from kernel.onnx_splice import exporter_for
from protos import fogfl_pb2 as pb
from protos.control import TrainConfig


@dataclass
class LocalResult:
    update: dict[str, np.ndarray]
    hparams: pb.LocalHParams
    loss: float
    num_samples: int


def local_update(
    spec: dict,
    served: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    seed: int = 0,
) -> LocalResult:
    if len(x) == 0:
        raise ValueError("no samples to train on")
    model = build_model(spec)
    set_params(model, served)
    model.train()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    loss_fn = nn.CrossEntropyLoss()
    n = len(xt)

    if cfg.update_kind == "gradient":
        model.zero_grad()
        loss = loss_fn(model(xt), yt)
        loss.backward()
        update = {k: p.grad.detach().numpy().astype(np.float32, copy=True) for k, p in model.named_parameters()}
        hp = pb.LocalHParams(lr=cfg.lr, epochs=1, steps=1, batch_size=n, optimizer="sgd", momentum=0.0,
                             prox_mu=0.0, shuffle=False)
        return LocalResult(update, hp, float(loss.item()), n)

    global_params = [p.detach().clone() for p in model.parameters()] if cfg.prox_mu > 0 else None
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    gen = torch.Generator().manual_seed(seed)
    steps, total, seen = 0, 0.0, 0
    bs = min(cfg.batch_size, n)
    done = False
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=gen) if cfg.shuffle else torch.arange(n)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            obj = loss
            if global_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True))
                obj = loss + 0.5 * cfg.prox_mu * prox
            obj.backward()
            opt.step()
            steps += 1
            total += float(loss.item()) * len(idx)
            seen += len(idx)
            if cfg.max_steps and steps >= cfg.max_steps:
                done = True
                break
        if done:
            break
    new = get_params(model)
    update = {k: new[k] - served[k] for k in served}
    hp = pb.LocalHParams(lr=cfg.lr, epochs=cfg.local_epochs, steps=steps, batch_size=bs, optimizer=cfg.optimizer,
                         momentum=cfg.momentum if cfg.optimizer == "sgd" else 0.0, prox_mu=cfg.prox_mu,
                         shuffle=cfg.shuffle)
    return LocalResult(update, hp, total / max(seen, 1), n)


def preload() -> float:
    """Pay torch's lazy imports now rather than in the first round: the first optimizer a process
    makes imports ``torch._dynamo`` (~1 s of CPU here), and the first ONNX export ``torch.onnx``
    (~0.8 s), which otherwise stall round 1 in every fog while the cloud and the edges wait. One
    SGD step on a one-sample MLP and the ONNX template of that MLP (the real model's trace then
    takes 10-60 ms). Returns the seconds it took."""
    import time

    t0 = time.perf_counter()
    spec = {"arch": "mlp", "in_shape": [1, 2, 2], "num_classes": 2, "hidden": 2}
    served = get_params(build_model(spec, seed=0))
    local_update(spec, served, np.zeros((1, 1, 2, 2), np.float32), np.zeros(1, np.int64),
                 TrainConfig(local_epochs=1, batch_size=1))
    exporter_for(spec)
    return time.perf_counter() - t0
