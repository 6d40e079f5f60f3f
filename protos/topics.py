"""MQTT topic names. The only place in fogfl where a topic string is formatted.

Every topic lives under ``fogfl/<run_id>/`` so that several runs can share one broker.
"""

from __future__ import annotations

import re

from protos.errors import WireError

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_id(kind: str, value: str) -> str:
    """Node and run ids become topic levels: no '/', '+', '#' or spaces. Raises WireError (a
    ValueError) on a bad id."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise WireError(f"{kind} id {value!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
    return value


class Topics:
    def __init__(self, run_id: str) -> None:
        self.run_id = check_id("run", run_id)
        self.root = f"fogfl/{run_id}"

    # cloud -> fogs: round announcements (JSON, retained, QoS 1). Edges do not subscribe: a fog
    # relays the announcement to its edges inside the EdgeModel it serves for the round.
    @property
    def rounds(self) -> str:
        return f"{self.root}/rounds"

    # cloud -> all: the run's end (the "done" announcement, JSON, retained, QoS 1), also sent on
    # the rounds topic. Edges subscribe to this one, so that they learn of it without their fog.
    @property
    def done(self) -> str:
        return f"{self.root}/done"

    # cloud -> all: per-round results (JSON, retained) for dashboards and the launcher
    @property
    def metrics(self) -> str:
        return f"{self.root}/metrics"

    # edge -> fog: labelled samples (SampleBatch, QoS 1)
    def samples(self, fog_id: str) -> str:
        return f"{self.root}/fog/{check_id('fog', fog_id)}/samples"

    # fog -> its edges: ONNX model (EdgeModel, retained, QoS 1)
    def edge_model(self, fog_id: str) -> str:
        return f"{self.root}/fog/{check_id('fog', fog_id)}/model"

    # any node: liveness, "online"/"offline" (retained; "offline" is the last will)
    def status(self, node_id: str) -> str:
        return f"{self.root}/status/{check_id('node', node_id)}"

    @property
    def status_all(self) -> str:
        return f"{self.root}/status/+"

    @staticmethod
    def node_of_status(topic: str) -> str:
        return topic.rsplit("/", 1)[-1]
