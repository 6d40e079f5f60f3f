"""JSON control messages (MQTT), readable by any MQTT tool. Validated on receipt."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protos.errors import WireError

SCHEMA_VERSION = 1
# gRPC trailing metadata of a refused request for a next round's model (ModelRequest.wait_ms):
# the round the refusal is about
ROUND_METADATA = "fogfl-round"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AcquisitionConfig(_Strict):
    budget: int = Field(20, ge=0, description="samples each edge labels per round")
    strategy: str = Field("uncertainty", description="query strategy name")
    subset: int = Field(0, ge=0, description="score a random subset of this size of the pool (0 = whole pool)")
    deadline_s: float = Field(20.0, gt=0, description="how long a fog waits for its edges")


class TrainConfig(_Strict):
    local_epochs: int = Field(2, ge=1)
    max_steps: int = Field(0, ge=0, description="stop after this many optimiser steps (0 = no cap)")
    lr: float = Field(0.02, gt=0)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    update_kind: Literal["delta", "gradient"] = "delta"
    prox_mu: float = Field(0.0, ge=0)
    shuffle: bool = True
    train_on: Literal["pool", "round"] = Field("pool", description="whole pool, or only this round's samples")
    report_label_counts: bool = Field(
        False, description="send per-class sample counts with the update (only strategies that weight by "
                           "class need them; they tell an attacker the batch's labels)")


class Announcement(_Strict):
    """Cloud -> all, on the rounds topic (retained, QoS 1)."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["round", "done"] = "round"
    run_id: str
    round: int = Field(ge=0)
    model_version: int = Field(ge=0)
    selected: list[str] = Field(default_factory=list)
    deadline_s: float = Field(60.0, gt=0)
    min_updates: int = Field(1, ge=0)
    acquisition: AcquisitionConfig = Field(default_factory=AcquisitionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    issued_at: float = Field(0.0, description="Unix time the cloud announced the round, in whole seconds")

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Announcement:
        return parse_json(cls, data)


class RoundMetrics(_Strict):
    """Cloud -> all, on the metrics topic, after each round (retained)."""

    round: int
    model_version: int
    accuracy: float
    loss: float
    labels_used: int
    bytes_up: int
    bytes_down: int
    edge_bytes_up: int = 0
    edge_bytes_down: int = 0
    updates: int
    wall_s: float
    final: bool = False

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> RoundMetrics:
        return parse_json(cls, data)


def parse_json(cls: type[BaseModel], data: bytes | str):
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"{cls.__name__}: not JSON ({exc.__class__.__name__})") from None
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise WireError(f"{cls.__name__}: {where}: {first['msg']}") from None
