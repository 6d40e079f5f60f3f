"""One interface for every reconstruction attack, in the spirit of breaching's
``reconstruct(server_payload, shared_data)``: the capture plays both roles (what the server sent,
what the fog shared back).

    attack = get_attack("idlg", iterations=300, seed=0)
    rec = attack.reconstruct(capture, progress=callback)
    rec.x  # (B, C, H, W) float32 in [0, 1]; rec.y  # (B,) int64, -1 where unknown

Attacks never read ground truth; scoring (``attacks.scoring``) is separate.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernel.errors import FogflError
from protos.capture import Capture

Progress = Callable[[int, int, dict], None]  # (done, total, info such as {"loss": ...})


class AttackError(FogflError):
    """An attack cannot run on this capture (wrong update kind, unmet structural condition, ...).
    The message says why in one line."""


@dataclass
class Reconstruction:
    x: np.ndarray
    y: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


class Attack(ABC):
    """Subclasses set ``name`` and implement ``_reconstruct``. Options are keyword arguments with
    defaults from the paper the attack comes from."""

    name: str = ""
    summary: str = ""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def reconstruct(self, capture: Capture, progress: Progress | None = None) -> Reconstruction:
        t0 = time.perf_counter()
        rec = self._reconstruct(capture, progress)
        rec.x = np.clip(np.asarray(rec.x, dtype=np.float32), 0.0, 1.0)
        rec.y = np.asarray(rec.y, dtype=np.int64)
        rec.stats.setdefault("attack", self.name)
        rec.stats["seconds"] = time.perf_counter() - t0
        return rec

    @abstractmethod
    def _reconstruct(self, capture: Capture, progress: Progress | None) -> Reconstruction: ...


REGISTRY: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


ATTACK_MODULES = ("analytic", "rows", "gradient_matching", "mkor")


def _load_all() -> None:
    """Importing the modules registers their attacks."""
    import importlib

    for mod in ATTACK_MODULES:
        importlib.import_module(f"attacks.{mod}")


def get_attack(name: str, **options: Any) -> Attack:
    _load_all()
    if name not in REGISTRY:
        raise AttackError(f"unknown attack {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)


def available() -> dict[str, str]:
    _load_all()
    return {k: v.summary for k, v in sorted(REGISTRY.items())}
