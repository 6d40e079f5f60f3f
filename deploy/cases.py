"""Attack cases without a running federation: a served model, a batch of real samples, and the
update the *real* fog trainer (and, if asked, the fog's defenses) produces from them, packed as
the same capture the taps write. Used by tests, benchmarks and the study."""

from __future__ import annotations

import json
import time

import numpy as np

from fog.trainer import local_update
from kernel.config import DefenseConfig
from kernel.models import build_model, get_params
from protos import fogfl_pb2 as pb
from protos.capture import Capture, build_capture
from protos.codec import decode_tensors, encode_tensors
from protos.control import TrainConfig


def make_capture(
    spec: dict,
    x: np.ndarray,
    y: np.ndarray,
    train: TrainConfig | None = None,
    served: dict[str, np.ndarray] | None = None,
    *,
    seed: int = 0,
    defense: DefenseConfig | None = None,
    round_: int = 1,
    fog_id: str = "fog-0",
    source: str = "case",
    note: str = "",
    peers: list[str] | None = None,
) -> Capture:
    """Run the fog's trainer on (x, y) from ``served`` (default: a fresh model from ``seed``).
    ``peers``: the round's selected fogs, for secure-aggregation masking (default: this fog alone,
    which leaves the update unmasked but scaled by its sample count)."""
    train = train or TrainConfig(update_kind="gradient")
    if served is None:
        served = get_params(build_model(spec, seed=seed))
    res = local_update(spec, served, x, y, train, seed=seed)
    update = res.update
    defense_json = ""
    if defense is not None and _active(defense):
        from fog.defenses import apply_defenses

        update = apply_defenses(update, defense, rng=np.random.default_rng(seed), fog_id=fog_id,
                                round_=round_, peers=peers or [fog_id], num_samples=res.num_samples)
        defense_json = defense.model_dump_json()
    served_payload = encode_tensors(served)
    update_payload = encode_tensors(update)
    header = pb.UpdateHeader(
        fog_id=fog_id, round=round_, base_version=round_ - 1, num_samples=res.num_samples,
        update_kind=train.update_kind, hparams=res.hparams, total_bytes=len(update_payload),
        labels_total=res.num_samples, defense=defense_json, train_loss=res.loss,
    )
    msg = build_capture(source=source, arch_json=json.dumps(spec), model_version=round_ - 1,
                        served_payload=served_payload, header=header, update_payload=update_payload,
                        captured_at=time.time(), note=note)
    return Capture(message=msg, served=decode_tensors(served_payload), update=decode_tensors(update_payload),
                   arch=dict(spec))


def _active(d: DefenseConfig) -> bool:
    return bool(d.clip or d.noise_sigma or d.prune_ratio or d.masking)
