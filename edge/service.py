"""The edge's network driver: MQTT in, :class:`~edge.node.EdgeNode` in the middle, MQTT out.

- Connects with :class:`kernel.mqtt.MqttLink` (client id = edge id; last will ``offline`` and
  ``online`` retained on the edge's status topic); an unreachable broker raises
  :class:`~kernel.errors.ConnectError`.
- Subscribes to its fog's model topic (each ``EdgeModel`` carries the announcement of the round
  it is served for) and to the cloud's done topic, not to the rounds topic. paho's callbacks only
  put messages on a queue; the calling thread of :func:`run_edge` is the worker that runs the node
  (ONNX inference, queries), so the network loop never waits on inference. A PUBACK also wakes
  the worker (no polling on the path of a round).
- Everything the node emits is in its outbox (on disk with a state dir) before it is published;
  an entry leaves the outbox only when the broker's PUBACK came back. With
  ``edge.durability: async`` the entry's fsync comes right after the publish, overlapping the
  broker's round trip (see :mod:`edge.outbox`). Entries left over from an earlier run are re-sent
  first; an entry without an ack after ``resend_s`` is sent again (the fog de-duplicates by
  ``(edge_id, seq)``).
- Runs until a ``done`` announcement (then waits up to ``drain_s`` for outstanding acks) or until
  ``stop`` is set.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from edge.labeler import Labeler
from edge.node import EdgeNode
from kernel.config import RunConfig
from kernel.mqtt import MqttLink
from kernel.runtime import settle_heap

log = logging.getLogger(__name__)

_IDLE_S = 0.25  # how often an idle worker looks at stop, reconnects and resends


class _Sender:
    """Publishes the node's outbox entries (QoS 1) and acknowledges them once the broker did.
    ``wake`` is called (on paho's network thread) whenever the broker acknowledged something."""

    def __init__(self, link: MqttLink, node: EdgeNode, resend_s: float, wake: Callable[[], None]) -> None:
        self.link = link
        self.node = node
        self.resend_s = resend_s
        self.inflight: dict[int, tuple[mqtt.MQTTMessageInfo, float]] = {}
        self.delivered = 0
        self._acked = threading.Event()

        def on_published(mid: int) -> None:
            self._acked.set()
            wake()

        link.on_published = on_published

    def pump(self) -> None:
        self._acked.clear()
        now = time.monotonic()
        published = False
        for entry in self.node.outbox.pending():
            sent = self.inflight.get(entry.seq)
            if sent is not None:
                info, at = sent
                try:
                    done = info.is_published()
                except (RuntimeError, ValueError):  # refused by paho (e.g. no connection): send again
                    done, at = False, float("-inf")
                if done:
                    del self.inflight[entry.seq]
                    self.node.delivered(entry.seq)
                    self.delivered += 1
                    log.debug("%s: batch seq %d acknowledged by the broker", self.node.edge_id, entry.seq)
                    continue
                if now - at < self.resend_s:
                    continue
                log.info("%s: no ack for seq %d after %.0fs; sending again", self.node.edge_id, entry.seq,
                         now - at)
            if not self.link.client.is_connected():
                continue
            info = self.link.client.publish(entry.msg.topic, entry.msg.payload, qos=entry.msg.qos,
                                            retain=entry.msg.retain)
            self.link.bytes_out += len(entry.msg.payload)
            self.inflight[entry.seq] = (info, now)
            published = True
        if published:
            self.node.outbox.sync()  # durability "async": the fsync overlaps the broker's round trip

    def drain(self, timeout: float) -> bool:
        """Pump until the outbox is empty or ``timeout`` passes. True if everything was acked."""
        end = time.monotonic() + timeout
        self.pump()
        while len(self.node.outbox) and time.monotonic() < end:
            self._acked.wait(min(_IDLE_S, max(0.0, end - time.monotonic())))
            self.pump()
        return len(self.node.outbox) == 0


def run_edge(
    cfg: RunConfig,
    edge_id: str,
    state_dir: Path | str | None = None,
    stop: threading.Event | None = None,
    *,
    labeler: Labeler | None = None,
    connect_timeout: float = 10.0,
    resend_s: float = 30.0,
    drain_s: float = 10.0,
    initial_model: tuple[bytes, str] | None = None,
) -> EdgeNode:
    """Run edge ``edge_id`` of ``cfg`` against the broker in ``cfg.mqtt`` until the run is done
    (or ``stop`` is set). Returns the node (its counters tell what it did)."""
    node = EdgeNode(cfg, edge_id, state_dir, labeler=labeler, threads=cfg.edge.threads,
                    durability=cfg.edge.durability)
    if initial_model is not None:
        node.preload(initial_model[0], source=initial_model[1])
    settle_heap()  # before it goes online (kernel.runtime: no full-collection stalls mid-run)
    topics = node.topics
    model_topic = topics.edge_model(node.fog_id)
    inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()  # None: the broker acknowledged something

    def enqueue(topic: str, payload: bytes) -> None:  # paho's network thread: never block here
        inbox.put((topic, payload))

    link = MqttLink(cfg.mqtt, client_id=edge_id, status_topic=topics.status(edge_id))
    # rounds come from the fog, inside the model it serves for each; only the run's end from the cloud
    link.subscribe(model_topic, enqueue)
    link.subscribe(topics.done, enqueue)
    link.connect(timeout=connect_timeout)
    log.info("%s: connected to %s:%d (run %s, fog %s)", edge_id, link.host, cfg.mqtt.port, cfg.run_id, node.fog_id)
    sender = _Sender(link, node, resend_s, wake=lambda: inbox.put(None))
    stopped = False
    try:
        if len(node.outbox):
            log.info("%s: re-sending %d batch(es) from an earlier run", edge_id, len(node.outbox))
        while True:
            if stop is not None and stop.is_set():
                stopped = True
                break
            try:
                item = inbox.get(timeout=_IDLE_S)
            except queue.Empty:
                item = None
            if item is not None:
                topic, payload = item
                try:
                    if topic == model_topic:
                        node.on_model(payload)
                    elif topic == topics.done:
                        node.on_announcement(payload)
                except Exception:  # a node bug must not take the edge down; the message is dropped
                    log.exception("%s: failed to handle a message on %s", edge_id, topic)
            sender.pump()
            if node.finished and inbox.empty():
                break
        if not sender.drain(1.0 if stopped else drain_s):
            log.warning("%s: %d batch(es) not acknowledged; they stay in the outbox%s", edge_id, len(node.outbox),
                        "" if node.outbox.durable else " (in memory: lost on exit)")
    finally:
        link.close()
        node.outbox.close()
    log.info("%s: %s; %d labels sent in %d batch(es), %d message(s) rejected", edge_id,
             "stopped" if stopped else "run finished", node.labels_sent, sender.delivered, node.rejected)
    return node
