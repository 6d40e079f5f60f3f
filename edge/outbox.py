"""A durable outbox for messages that must reach the broker (QoS 1).

A message is written to disk (atomically: temp file, fsync, rename) *before* it is published and
removed only once the broker acknowledged it (PUBACK). After a crash or restart, whatever is still
in the outbox is sent again; receivers de-duplicate by ``(edge_id, seq)``.

Sequence numbers never go backwards across restarts for anything that was stored: a pending
entry carries its own seq (the next one continues above it), and the counter file is written
before an entry is dropped on ack. A number handed out by :meth:`Outbox.next_seq` but never
stored can be handed out again after a crash, which is harmless: nothing carried it. (That keeps
one fsync off the path between a query and its publish.) A caller that publishes without storing
(``EdgeNode(track_delivery=False)``) persists the counter itself and restores it with
:meth:`Outbox.advance`.

Without a directory the outbox lives in memory (same interface, nothing survives the process).

On disk, under ``directory``: ``seq`` (the next sequence number, text) and one file per pending
message, ``<seq>.msg``: the magic ``FOGFLOB1``, a 4-byte big-endian header length, a JSON header
(seq, topic, qos, retain) and the payload bytes.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import ConfigError
from protos.envelope import Publish

log = logging.getLogger(__name__)

_MAGIC = b"FOGFLOB1"
_SUFFIX = ".msg"


@dataclass(frozen=True)
class Entry:
    seq: int
    msg: Publish


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every file system lets a directory be fsync'ed
        pass
    finally:
        os.close(fd)


def _encode(entry: Entry) -> bytes:
    header = json.dumps({"seq": entry.seq, "topic": entry.msg.topic, "qos": entry.msg.qos,
                         "retain": entry.msg.retain}).encode()
    return _MAGIC + struct.pack(">I", len(header)) + header + entry.msg.payload


def _decode(data: bytes) -> Entry:
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise ValueError("bad magic")
    (hlen,) = struct.unpack(">I", data[len(_MAGIC) : len(_MAGIC) + 4])
    start = len(_MAGIC) + 4
    if start + hlen > len(data):
        raise ValueError("truncated header")
    h = json.loads(data[start : start + hlen])
    msg = Publish(topic=str(h["topic"]), payload=bytes(data[start + hlen :]), qos=int(h["qos"]),
                  retain=bool(h["retain"]))
    return Entry(int(h["seq"]), msg)


class Outbox:
    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._lock = threading.Lock()
        self._entries: dict[int, Entry] = {}
        self._next = 1
        self._persisted_next = 1
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create the outbox directory {self.directory}: {exc.strerror}") from None
            if not os.access(self.directory, os.W_OK):
                raise ConfigError(f"outbox directory {self.directory} is not writable")
            self._load()

    @property
    def durable(self) -> bool:
        return self.directory is not None

    def _load(self) -> None:
        assert self.directory is not None
        seq_file = self.directory / "seq"
        if seq_file.exists():
            try:
                self._next = self._persisted_next = max(1, int(seq_file.read_text().strip()))
            except ValueError:
                log.warning("outbox %s: unreadable seq file; continuing after the highest pending seq",
                            self.directory)
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            try:
                entry = _decode(path.read_bytes())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                bad = path.with_suffix(".corrupt")
                log.warning("outbox %s: %s is unreadable (%s); moved aside to %s", self.directory, path.name,
                            exc.__class__.__name__, bad.name)
                path.replace(bad)
                continue
            self._entries[entry.seq] = entry
        if self._entries:
            self._next = max(self._next, max(self._entries) + 1)
            log.info("outbox %s: %d message(s) pending from an earlier run", self.directory, len(self._entries))

    def _path(self, seq: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{seq:020d}{_SUFFIX}"

    @property
    def next(self) -> int:
        """The sequence number :meth:`next_seq` hands out next."""
        with self._lock:
            return self._next

    def next_seq(self) -> int:
        """A fresh sequence number, above every stored or acknowledged one."""
        with self._lock:
            seq = self._next
            self._next += 1
            return seq

    def advance(self, next_seq: int) -> None:
        """Never hand out a number below ``next_seq`` (restored from a caller's own state)."""
        with self._lock:
            self._next = max(self._next, int(next_seq))

    def _persist_seq(self) -> None:
        if self.directory is not None and self._next > self._persisted_next:
            atomic_write(self.directory / "seq", f"{self._next}\n".encode())
            self._persisted_next = self._next

    def put(self, seq: int, msg: Publish) -> Entry:
        """Store ``msg`` under ``seq`` (durably, when on disk) until :meth:`ack`."""
        entry = Entry(seq, msg)
        with self._lock:
            if self.directory is not None:
                atomic_write(self._path(seq), _encode(entry))
            self._entries[seq] = entry
        return entry

    def ack(self, seq: int) -> bool:
        """The broker acknowledged ``seq``: forget it. False if it was not pending."""
        with self._lock:
            entry = self._entries.pop(seq, None)
            if entry is not None and self.directory is not None:
                self._persist_seq()  # the entry was the durable record of its seq; keep it counted
                try:
                    self._path(seq).unlink()
                except FileNotFoundError:
                    pass
                _fsync_dir(self.directory)
            return entry is not None

    def pending(self) -> list[Entry]:
        """Messages not yet acknowledged, oldest first."""
        with self._lock:
            return [self._entries[s] for s in sorted(self._entries)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
