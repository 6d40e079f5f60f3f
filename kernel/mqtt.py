"""A thin paho-mqtt 2.x link shared by every tier's network driver (torch-free).

- Always ``CallbackAPIVersion.VERSION2``, MQTT 3.1.1 (the embedded amqtt broker speaks no 5.0).
- Last will ``offline`` on the node's status topic; ``online`` (retained) once connected.
- ``connect()`` fails fast with a one-line :class:`ConnectError` when the broker is unreachable,
  and returns once the broker confirmed the subscriptions (SUBACK), so a message published right
  after it returns is delivered (a fresh session has no subscription until then).
- Handlers run on paho's network thread; a handler that raises is logged and counted, and the
  link keeps running (a bad message never takes a node down).
- TCP_NODELAY on the socket: the messages of a round are small and each waits on the one before
  it, so Nagle's algorithm (with the peer's delayed ACKs) would hold them back for tens of
  milliseconds. (Configure the broker the same way: Mosquitto's ``set_tcp_nodelay true``.)
- ``on_published(mid)``, if set, is called on the network thread when the broker acknowledged a
  QoS 1 publish (PUBACK), so a sender can react at once instead of polling.
- ``persistent=True``: a session the broker keeps across disconnects (MQTT 3.1.1
  ``clean_session=0``), so QoS 1 messages published while the node is away (a crash, a restart, a
  network outage) are queued by the broker and delivered when it is back. A sender gets its PUBACK
  from the broker, not from the receiver, and drops its copy then: without a kept session a
  message published while its receiver is away is lost. ``connect(fresh_session=True)`` first
  discards a session a previous run left under the same client id, so its messages are not taken
  for this run's.
- ``manual_ack=True``: a QoS 1 message is acknowledged only once its handlers returned. A handler
  that could not take the message in (it could not store it) raises :class:`Undelivered`: the
  message is left unacknowledged, so a broker that keeps the session delivers it again when the
  node reconnects, and ``on_undelivered(topic, reason)`` is called. (Without it the PUBACK goes
  out whatever the handler did, and the sender drops its copy.) A handler that fails otherwise
  (a bad message) is logged and counted, and the message is acknowledged: sending it again would
  fail again.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from kernel.config import MqttConfig
from kernel.errors import ConnectError
from protos.envelope import Publish

log = logging.getLogger(__name__)
Handler = Callable[[str, bytes], None]
_DISCARD_GRACE_S = 0.3


class Undelivered(Exception):
    """Raised by a handler that could not take a message in: leave it unacknowledged."""


class MqttLink:
    def __init__(self, cfg: MqttConfig, client_id: str, status_topic: str | None = None,
                 persistent: bool = False, manual_ack: bool = False) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.persistent = persistent
        self.manual_ack = manual_ack
        self.on_undelivered: Callable[[str, str], None] | None = None
        self.undelivered = 0
        self.status_topic = status_topic
        self._handlers: list[tuple[str, Handler]] = []
        self._connected = threading.Event()  # set once the broker confirmed the subscriptions
        self._suback_mid: int | None = None
        self._errors = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.on_published: Callable[[int], None] | None = None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                        clean_session=not persistent)
        if status_topic:
            c.will_set(status_topic, b"offline", qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_socket_open = _no_delay
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.manual_ack_set(manual_ack)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        self.client = c

    @property
    def host(self) -> str:
        return self.cfg.host or "127.0.0.1"

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def connected(self) -> bool:
        """Connected, and the broker confirmed the subscriptions."""
        return self._connected.is_set()

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        """Register before or after connect; re-subscribed on every reconnect."""
        self._handlers.append((topic, handler))
        if self._connected.is_set():
            self.client.subscribe(topic, qos=qos)

    def connect(self, timeout: float = 10.0, fresh_session: bool = False) -> MqttLink:
        """Connect and start the network thread. ``fresh_session`` (persistent links): discard what
        the broker kept for this client id from an earlier connection before this one starts."""
        if self.persistent and fresh_session:
            self._discard_session(timeout)
        try:
            self.client.connect(self.host, self.cfg.port, keepalive=self.cfg.keepalive)
        except (OSError, ValueError) as exc:
            raise self._unreachable(exc) from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.client.loop_stop()
            raise self._not_accepted(timeout)
        return self

    def _unreachable(self, exc: Exception) -> ConnectError:
        reason = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
        return ConnectError(f"cannot reach MQTT broker at {self.host}:{self.cfg.port}: {reason}")

    def _not_accepted(self, timeout: float) -> ConnectError:
        return ConnectError(f"MQTT broker at {self.host}:{self.cfg.port} did not accept the connection "
                            f"within {timeout:.0f}s")

    def _discard_session(self, timeout: float) -> None:
        """A clean-session connection under this client id makes the broker drop the kept session
        (its subscriptions and queued messages); then it disconnects."""
        done = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311,
                        clean_session=True)
        c.on_connect = lambda *_: done.set()
        try:
            c.connect(self.host, self.cfg.port, keepalive=self.cfg.keepalive)
        except (OSError, ValueError) as exc:
            raise self._unreachable(exc) from None
        c.loop_start()
        try:
            if not done.wait(timeout):
                raise self._not_accepted(timeout)
        finally:
            c.disconnect()
            c.loop_stop()
        # let the broker finish with that connection before the real one comes under the same id:
        # amqtt, handed the new connection first, "took it over" and dropped it ~1 s later with
        # the messages queued for it (seen on 1-3 of 4 fogs at every start)
        time.sleep(_DISCARD_GRACE_S)

    def publish(self, msg: Publish, wait: bool = True, timeout: float = 30.0) -> None:
        info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        self.bytes_out += len(msg.payload)
        if wait and msg.qos > 0:
            info.wait_for_publish(timeout)

    def close(self) -> None:
        if self.status_topic and self._connected.is_set():
            try:
                self.client.publish(self.status_topic, b"offline", qos=1, retain=True).wait_for_publish(2)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    # paho callbacks (network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("%s: broker refused the connection: %s", self.client_id, reason_code)
            return
        if self.status_topic:
            client.publish(self.status_topic, b"online", qos=1, retain=True)
        topics = [(topic, 1) for topic, _ in self._handlers]
        if not topics:
            self._connected.set()
            return
        # connected means subscribed: a message published right after connect() returns must
        # find the subscription (a fresh session has none until the broker's SUBACK)
        _, self._suback_mid = client.subscribe(topics)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._suback_mid:
            return
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("%s: the broker refused %d subscription(s): %s", self.client_id, len(refused),
                      ", ".join(refused))
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if reason_code != 0:
            log.warning("%s: lost the broker (%s); reconnecting", self.client_id, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        hook = self.on_published
        if hook is not None:
            try:
                hook(mid)
            except Exception:
                self._errors += 1
                log.exception("%s: publish hook failed", self.client_id)

    def _on_message(self, client, userdata, message) -> None:
        self.bytes_in += len(message.payload)
        held: str | None = None
        topic = message.topic
        for pattern, handler in self._handlers:
            # most subscriptions are exact topics: a string comparison, not paho's matcher (which
            # builds a trie on every call)
            if pattern == topic or (("+" in pattern or "#" in pattern) and mqtt.topic_matches_sub(pattern, topic)):
                try:
                    handler(topic, message.payload)
                except Undelivered as exc:
                    held = str(exc) or exc.__class__.__name__
                except Exception:  # a bad message must not take the node down
                    self._errors += 1
                    log.exception("%s: handler for %s failed; message dropped", self.client_id, message.topic)
        if held is not None:
            self.undelivered += 1
            log.error("%s: could not take in a message on %s, left unacknowledged: %s", self.client_id,
                      message.topic, held)
            hook = self.on_undelivered
            if hook is not None:
                hook(message.topic, held)
        elif self.manual_ack and message.qos > 0:
            client.ack(message.mid, message.qos)


def _no_delay(client, userdata, sock) -> None:
    """paho's on_socket_open: turn Nagle's algorithm off (no-op on sockets without TCP)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
