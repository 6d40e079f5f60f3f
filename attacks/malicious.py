"""Malicious-cloud plug-ins for the cloud's serve hook. The cloud itself knows nothing of attacks:
``fogfl cloud --malicious mkor --target fog-1`` plugs :func:`make_transform` into
``CloudNode(serve_transform=...)``. The target gets manipulated parameters (same architecture) and
a round config asking for one gradient on this round's samples; every other fog gets the honest
model and the announced config. The cloud does not aggregate an update computed on a model other
than the global one, so the global model stays sound."""

from __future__ import annotations

import logging

import numpy as np

from attacks.base import AttackError
from attacks.mkor import malicious_params, round_config
from protos.control import TrainConfig

log = logging.getLogger(__name__)

MALICIOUS = ("mkor",)


def make_transform(name: str, target: str, seed: int = 0, aux_x: np.ndarray | None = None,
                   inconspicuous: bool = False, base_train: TrainConfig | None = None):
    if name not in MALICIOUS:
        raise AttackError(f"unknown malicious server {name!r} ({', '.join(MALICIOUS)})")
    rng = np.random.default_rng([seed, 0xBAD])
    train = round_config(base_train).model_copy(update={"train_on": "round"})

    def transform(fog_id: str, round_: int, params: dict[str, np.ndarray], spec: dict):
        if fog_id != target:
            return None
        log.info("malicious cloud: serving MKOR parameters to %s in round %d", fog_id, round_)
        return malicious_params(spec, params, rng, inconspicuous=inconspicuous, aux_x=aux_x), train

    return transform
