"""A WAN between the fog sites and the cloud, emulated on one machine: TCP forwarders that delay
every byte by a fixed time in each direction (``fogfl run --wan-rtt MS``).

``tc qdisc ... netem`` is the usual tool, but it needs root and a kernel with ``sch_netem`` (this
project's CI machine runs as root but its kernel has no ``sch_netem``; Docker Desktop and macOS
have no ``tc``). A forwarder in user
space needs nothing: bytes read from one side are written to the other ``rtt / 2`` later, in
order, so a request and its reply take one round-trip time more than on loopback. Only latency is
emulated: no bandwidth limit, loss or jitter. Each direction holds at most
:attr:`DelayProxy.MAX_IN_FLIGHT` bytes in its delay line; a sender beyond that waits (a link whose
bandwidth-delay product is that many bytes).

The forwarders run on one event-loop thread of the process that starts them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from kernel.errors import ConfigError

log = logging.getLogger(__name__)

MAX_RTT_MS = 10_000.0


def check_rtt(rtt_ms: float) -> float:
    """A WAN round-trip time in milliseconds, or ConfigError."""
    if not 0 <= rtt_ms <= MAX_RTT_MS:  # also refuses NaN
        raise ConfigError(f"WAN round-trip time must be between 0 and {MAX_RTT_MS:.0f} ms, got {rtt_ms}")
    return float(rtt_ms)


class DelayProxy:
    """Forwards ``127.0.0.1:<port>`` (or ``listen_host``) to ``target``, each direction delayed by
    ``one_way_s``. :meth:`start` returns the port it listens on; :meth:`stop` closes the listener
    and every forwarded connection."""

    READ_SIZE = 1 << 16
    MAX_IN_FLIGHT = 64 << 20  # bytes per direction in the delay line

    def __init__(self, target: tuple[str, int], one_way_s: float, listen_host: str = "127.0.0.1") -> None:
        if one_way_s < 0:
            raise ConfigError(f"a delay cannot be negative ({one_way_s} s)")
        self.target = target
        self.one_way_s = one_way_s
        self.listen_host = listen_host
        self.port = 0
        self.connections = 0  # accepted so far
        self.bytes_forwarded = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, self.listen_host, 0))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=main, name=f"wan-proxy->{self.target[1]}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self.port

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ forwarding
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError as exc:
                log.warning("WAN proxy: cannot reach %s:%d (%s); connection dropped", *self.target, exc)
                return
            try:
                await asyncio.gather(self._pipe(reader, writer, up_writer), self._pipe(up_reader, up_writer, writer))
            finally:
                up_writer.close()
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, source: asyncio.StreamWriter,
                    writer: asyncio.StreamWriter) -> None:
        """Copy ``reader`` (the socket of ``source``) to ``writer``, each piece written ``one_way_s``
        after it was read. If the far side fails, the near one is dropped too (its read ends)."""
        loop = asyncio.get_running_loop()
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        room = asyncio.Semaphore(max(1, self.MAX_IN_FLIGHT // self.READ_SIZE))

        async def deliver() -> None:
            while True:
                due, data = await line.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                room.release()
                if not data:  # the sender closed its side: pass it on
                    with contextlib.suppress(OSError, RuntimeError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError, RuntimeError):
                    source.transport.abort()  # nowhere to deliver: the reading side ends too
                    room.release()  # in case it waits for room in the line
                    raise
                self.bytes_forwarded += len(data)

        sender = asyncio.create_task(deliver())
        try:
            while True:
                await room.acquire()
                try:
                    data = await reader.read(self.READ_SIZE)
                except (ConnectionError, OSError):
                    data = b""
                line.put_nowait((loop.time() + self.one_way_s, data))
                if not data:
                    break
            await sender
        except (ConnectionError, OSError, RuntimeError):
            pass  # one side went away: the connection ends
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                    await sender
