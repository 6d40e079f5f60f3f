"""A durable outbox for messages that must reach the broker (QoS 1).

A message is stored *before* it is published and removed only once the broker acknowledged it
(PUBACK). After a crash or restart, whatever is still in the outbox is sent again; receivers
de-duplicate by ``(edge_id, seq)``. How far "stored" goes before the publish is the outbox's
``durability``:

- ``"sync"`` (the default): written atomically (temp file, fsync, rename, directory fsync) before
  :meth:`Outbox.put` returns. A power cut at any moment loses nothing that was put.
- ``"async"``: written atomically to the OS (temp file, rename) before :meth:`Outbox.put`
  returns, and made durable by :meth:`Outbox.sync`, which the driver calls right after handing
  the message to the network, so that the fsync overlaps the broker's round trip instead of
  delaying the publish. (An entry the broker acknowledged before it was synced needs no sync:
  the broker has it.) A crash of the process loses nothing (the OS has the file); a power cut in
  the milliseconds between ``put`` and ``sync`` loses the entry if the broker did not get it
  either.

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
from typing import Literal

from kernel.errors import ConfigError
from protos.envelope import Publish

log = logging.getLogger(__name__)

_MAGIC = b"FOGFLOB1"
Durability = Literal["sync", "async"]
DURABILITIES: tuple[str, ...] = ("sync", "async")
_SUFFIX = ".msg"


@dataclass(frozen=True)
class Entry:
    seq: int
    msg: Publish


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.
    ``durable``: fsync the file and its directory (else a power cut may leave the old file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _fsync_file(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


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
    def __init__(self, directory: Path | str | None = None, durability: Durability = "sync") -> None:
        if durability not in DURABILITIES:
            raise ConfigError(f"unknown outbox durability {durability!r}; use one of {', '.join(DURABILITIES)}")
        self.directory = Path(directory) if directory is not None else None
        self.durability = durability
        self._lock = threading.Lock()
        self._entries: dict[int, Entry] = {}
        self._unsynced: set[int] = set()  # stored without fsync ("async"), not yet synced
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
        """Store ``msg`` under ``seq`` until :meth:`ack`: on disk and synced ("sync"), or on disk
        and synced by the next :meth:`sync` ("async")."""
        entry = Entry(seq, msg)
        with self._lock:
            if self.directory is not None:
                durable = self.durability == "sync"
                atomic_write(self._path(seq), _encode(entry), durable=durable)
                if not durable:
                    self._unsynced.add(seq)
            self._entries[seq] = entry
        return entry

    @property
    def unsynced(self) -> int:
        """Entries stored but not yet fsynced (only with ``durability="async"``)."""
        with self._lock:
            return len(self._unsynced)

    def sync(self) -> int:
        """Make every stored entry durable: one fsync per unsynced file, then one of the directory
        for all of them (their renames). Returns how many entries it synced."""
        with self._lock:
            seqs = sorted(self._unsynced)
            if not seqs or self.directory is None:
                return 0
            for seq in seqs:
                _fsync_file(self._path(seq))
            _fsync_dir(self.directory)
            self._unsynced.clear()
            return len(seqs)

    def ack(self, seq: int, counter_saved: bool = False) -> bool:
        """The broker acknowledged ``seq``: forget it. False if it was not pending.

        The entry was the durable record of its seq, so the counter is written first -- unless
        ``counter_saved``: the caller has just made a sequence number at least :attr:`next`
        durable itself (and restores it with :meth:`advance`). The unlink is not fsynced: an
        entry that a power cut brings back is sent again, and receivers drop it as a duplicate."""
        with self._lock:
            entry = self._entries.pop(seq, None)
            self._unsynced.discard(seq)  # the broker has it: no need to sync a file about to go
            if entry is not None and self.directory is not None:
                if not counter_saved:
                    self._persist_seq()
                try:
                    self._path(seq).unlink()
                except FileNotFoundError:
                    pass
            return entry is not None

    def pending(self) -> list[Entry]:
        """Messages not yet acknowledged, oldest first."""
        with self._lock:
            return [self._entries[s] for s in sorted(self._entries)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, seq: object) -> bool:
        with self._lock:
            return seq in self._entries
