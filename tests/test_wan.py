"""The emulated WAN of ``fogfl run --wan-rtt``: TCP forwarders that delay each direction."""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest

from deploy.broker import free_port
from deploy.wan import DelayProxy, check_rtt
from kernel.errors import ConfigError
from tests.helpers import fogfl, one_line_error


class EchoServer:
    """Echoes every byte back; closes its side when the client closes its own."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        part = s.recv(n - len(got))
        if not part:
            break
        got += part
    return bytes(got)


def test_each_direction_is_delayed_and_the_bytes_arrive_intact(echo):
    proxy = DelayProxy(("127.0.0.1", echo.port), one_way_s=0.05)
    port = proxy.start()
    try:
        with _connect(port) as s:
            t0 = time.monotonic()
            s.sendall(b"ping")
            assert _recv_exactly(s, 4) == b"ping"
            assert time.monotonic() - t0 >= 0.1  # there and back, 50 ms each way
            # a payload larger than the forwarder's reads, in both directions at once, in order
            big = bytes(range(256)) * 8192  # 2 MiB
            back: list[bytes] = []
            reader = threading.Thread(target=lambda: back.append(_recv_exactly(s, len(big))))
            reader.start()
            s.sendall(big)
            reader.join(30)
            assert back and back[0] == big
        assert proxy.connections == 1
        assert proxy.bytes_forwarded == 2 * (4 + len(big))
    finally:
        proxy.stop()


def test_a_half_close_is_passed_on(echo):
    proxy = DelayProxy(("127.0.0.1", echo.port), one_way_s=0.01)
    port = proxy.start()
    try:
        with _connect(port) as s:
            s.sendall(b"last words")
            s.shutdown(socket.SHUT_WR)  # the echo server sees the end, answers, and closes
            assert _recv_exactly(s, 10) == b"last words"
            assert s.recv(10) == b""  # its close came through too
    finally:
        proxy.stop()


def test_an_unreachable_target_drops_the_connection_and_the_proxy_keeps_serving(echo):
    dead = DelayProxy(("127.0.0.1", free_port()), one_way_s=0.0)
    port = dead.start()
    try:
        with _connect(port) as s:
            assert s.recv(10) == b""  # dropped, not hung
        with _connect(port) as s:  # still accepting
            assert s.recv(10) == b""
        assert dead.connections == 2
    finally:
        dead.stop()


def test_stop_ends_the_forwarded_connections(echo):
    proxy = DelayProxy(("127.0.0.1", echo.port), one_way_s=0.0)
    port = proxy.start()
    s = _connect(port)
    try:
        s.sendall(b"x")
        assert _recv_exactly(s, 1) == b"x"
        proxy.stop()
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass  # closed one way or the other: either ends it
        with pytest.raises(OSError):
            _connect(port).close()  # nobody listens any more
    finally:
        s.close()


@pytest.mark.parametrize("bad", [-1.0, math.nan, 1e6])
def test_round_trip_times_out_of_range_are_refused(bad):
    with pytest.raises(ConfigError, match="round-trip time"):
        check_rtt(bad)
    assert check_rtt(0) == 0.0 and check_rtt(40) == 40.0


def test_cli_refuses_a_bad_wan_rtt_in_one_line(tmp_path):
    line = one_line_error(fogfl("run", "--config", "small", "--quiet", "--wan-rtt", "-5", "--out", str(tmp_path / "a")))
    assert "round-trip time" in line
    line = one_line_error(fogfl("run", "--config", "small", "--quiet", "--engine", "inprocess", "--wan-rtt", "10",
                                "--out", str(tmp_path / "b")))
    assert "network engine" in line
