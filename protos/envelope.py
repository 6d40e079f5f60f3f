"""Transport-neutral outgoing messages. Node logic returns these; a driver (paho-mqtt, or the
in-process engine) delivers them. Payloads are the exact bytes the wire carries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
