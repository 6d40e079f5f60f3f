"""The in-process engine: the same edge, fog and cloud node objects as the network driver,
called directly in a deterministic order, with the same protobuf/JSON bytes the wire carries
(so byte counts and captures are identical). For sweeps and for massive topologies that a
2-core machine cannot run as a thousand processes.

Message flow of one round (what MQTT and gRPC do in the network engine):
announcement -> every fog; each selected fog downloads the model (bytes from
``CloudNode.serve_model``), publishes its ONNX model with the announcement to its edges; each
edge answers with a SampleBatch to its fog; the fog trains and uploads
(``CloudNode.receive_update``); the cloud aggregates and evaluates.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from cloud.node import CloudNode
from edge.node import EdgeNode
from fog.node import FogNode
from kernel.config import RunConfig, dump_config
from kernel.runtime import settle_heap
from protos.control import RoundMetrics
from protos.envelope import Publish
from protos.topics import Topics

log = logging.getLogger(__name__)


class LocalBus:
    """In-memory MQTT semantics for the engine: exact-topic subscriptions, retained messages,
    in-order delivery, and byte counting."""

    def __init__(self) -> None:
        self.subs: dict[str, list[Callable[[bytes], list[Publish] | object]]] = defaultdict(list)
        self.retained: dict[str, bytes] = {}
        self.bytes = 0
        self.messages = 0

    def subscribe(self, topic: str, handler: Callable[[bytes], object]) -> None:
        self.subs[topic].append(handler)
        if topic in self.retained:
            self._deliver(handler, self.retained[topic])

    def publish(self, msg: Publish) -> None:
        if msg.retain:
            self.retained[msg.topic] = msg.payload
        self.messages += 1
        for handler in list(self.subs.get(msg.topic, ())):
            self._deliver(handler, msg.payload)

    def _deliver(self, handler, payload: bytes) -> None:
        self.bytes += len(payload)
        out = handler(payload)
        if isinstance(out, list):
            for m in out:
                if isinstance(m, Publish):
                    self.publish(m)


class InProcessEngine:
    def __init__(self, cfg: RunConfig, out_dir: Path | str | None = None, *, capture: bool = False,
                 observers=None, serve_transform=None, threads: int | None = 1) -> None:
        """``threads`` caps torch's intra-op threads (1 by default: the models are small and
        thread hand-offs cost more than they save, especially on a loaded machine; None keeps
        torch's default)."""
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir else None
        observers = list(observers or [])
        truth_dir = None
        if capture and self.out_dir is not None:
            from attacks.taps import CaptureRecorder

            observers.append(CaptureRecorder(self.out_dir / "captures", source="curious-cloud"))
            truth_dir = self.out_dir / "captures"
        t0 = time.perf_counter()
        self.cloud = CloudNode(cfg, out_dir=self.out_dir, observers=observers, serve_transform=serve_transform)
        self.topics = Topics(cfg.run_id)
        self.bus = LocalBus()
        self.fogs: dict[str, FogNode] = {f: FogNode(cfg, f, truth_dir=truth_dir) for f in cfg.fog_ids()}
        self.edges: dict[str, EdgeNode] = {}
        ds, splits = self.cloud.ds, self.cloud.splits  # computed once, shared by every edge
        for fog_id, fog in self.fogs.items():
            self.bus.subscribe(self.topics.samples(fog_id), fog.on_samples)
            for edge_id in cfg.edge_ids(fog_id):
                # every returned message is delivered at once here: no outbox bookkeeping needed
                edge = EdgeNode(cfg, edge_id, dataset=ds, splits=splits, track_delivery=False)
                self.edges[edge_id] = edge
                self.bus.subscribe(self.topics.edge_model(fog_id), edge.on_model)
                self.bus.subscribe(self.topics.done, edge.on_announcement)
        self.setup_s = time.perf_counter() - t0
        log.info("in-process engine: %d fogs, %d edges set up in %.2fs", len(self.fogs), len(self.edges), self.setup_s)

    def run_round(self) -> RoundMetrics:
        ann = self.cloud.start_round()
        payload = ann.to_json()
        taking_part = [f for f, fog in self.fogs.items() if fog.on_announcement(payload) is not None]
        for fog_id in taking_part:
            fog = self.fogs[fog_id]
            header, model_payload = self.cloud.serve_model(fog_id, ann.round)
            for pub in fog.on_model(header, model_payload):
                self.bus.publish(pub)  # -> edges query, label, publish samples -> fog pools them
            if not fog.acquisition_complete():
                log.warning("%s round %d: not every edge delivered", fog_id, ann.round)
            up_header, up_payload = fog.train()
            ack = self.cloud.receive_update(up_header, up_payload)
            if not ack.accepted:
                log.error("%s round %d: update rejected: %s", fog_id, ann.round, ack.reason)
        metrics = self.cloud.finish_round()
        self.cloud.write_metrics()
        return metrics

    def run(self, progress: bool = False) -> list[RoundMetrics]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]in-process"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not progress)
        with bar:
            task = bar.add_task("rounds", total=self.cfg.rounds, info="")
            for _ in range(self.cfg.rounds):
                m = self.run_round()
                bar.update(task, advance=1, info=f"acc {m.accuracy:.3f}  labels {m.labels_used}")
        self.bus.publish(Publish(self.topics.done, self.cloud.done_announcement().to_json(), retain=True))
        return self.cloud.history


def run_inprocess(cfg: RunConfig, out_dir: Path | str, capture: bool = False, progress: bool = False) -> CloudNode:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    engine = InProcessEngine(cfg, out, capture=capture)
    settle_heap()  # as every node process of the networked run does before going online
    engine.run(progress=progress)
    engine.cloud.flush()
    engine.cloud.write_metrics()
    return engine.cloud
