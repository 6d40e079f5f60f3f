"""kernel.mqtt.MqttLink against a real broker: Nagle off on its socket (a round's small messages
must not wait for the peer's delayed ACKs) and a PUBACK hook that fires with the publish's mid."""

from __future__ import annotations

import socket
import threading

import pytest

from deploy.broker import EmbeddedBroker
from kernel.config import MqttConfig
from kernel.mqtt import MqttLink
from protos.envelope import Publish


@pytest.fixture(scope="module")
def broker():
    b = EmbeddedBroker().start()
    yield b
    b.stop()


def test_the_link_turns_nagle_off(broker):
    link = MqttLink(MqttConfig(host="127.0.0.1", port=broker.port), "nodelay-test").connect()
    try:
        sock = link.client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        link.close()


def test_on_published_fires_with_the_mid_of_each_acknowledged_publish(broker):
    link = MqttLink(MqttConfig(host="127.0.0.1", port=broker.port), "puback-test").connect()
    acked: list[int] = []
    got = threading.Event()

    def hook(mid: int) -> None:
        acked.append(mid)
        got.set()

    link.on_published = hook
    try:
        info = link.client.publish("fogfl/puback-test/x", b"payload", qos=1)
        assert got.wait(10)
        assert info.mid in acked and info.is_published()
        link.on_published = lambda mid: 1 / 0  # a failing hook is logged and counted, the link goes on
        errors = link.errors
        link.publish(Publish("fogfl/puback-test/x", b"again", qos=1))
        assert link.errors == errors + 1
    finally:
        link.close()
