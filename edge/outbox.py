"""A durable outbox for messages that must reach the broker (QoS 1).

A message is stored *before* it is published and dropped only once the broker acknowledged it
(PUBACK). After a crash or restart, whatever is still in the outbox is sent again; receivers
de-duplicate by ``(edge_id, seq)``.

With a directory, the outbox is a :class:`kernel.journal.Journal` (``outbox.journal``): storing a
message appends a *put* record (the seq, topic, flags and payload), an acknowledgement appends an
*ack* record. A message is pending when its put has no ack after it. Acks are not synced: one lost
in a power cut only means the message is sent again, and the receiver drops the duplicate. How far
"stored" goes before the publish is the outbox's ``durability``:

- ``"sync"`` (the default): the put is on stable storage (``fdatasync``) before :meth:`Outbox.put`
  returns. A power cut at any moment loses nothing that was put.
- ``"async"``: the put is written to the OS before :meth:`Outbox.put` returns and made durable by
  :meth:`Outbox.sync`, which the driver calls right after handing the message to the network, so
  that the sync overlaps the broker's round trip instead of delaying the publish. (An entry the
  broker acknowledged before it was synced needs no sync: the broker has it.) A crash of the
  process loses nothing (the OS has the data); a power cut in the milliseconds between ``put`` and
  ``sync`` loses the entry if the broker did not get it either.

Put records stay in the journal after their ack, until :meth:`Outbox.compact`: they are the
record of what was sent (:meth:`Outbox.recorded`), which the edge node reads back on restart. The
node compacts when :attr:`Outbox.needs_compaction` (the journal passed ``compact_bytes``), after
writing its own state; compaction rewrites the journal with the pending entries only.

Sequence numbers never go backwards across restarts for anything that was stored: every put
record carries its seq (the next one continues above the highest in the journal), and compaction
writes the counter (the ``seq`` file) before it drops records, unless the caller saved it
itself (``counter_saved``; it restores it with :meth:`Outbox.advance`). A number handed out by
:meth:`Outbox.next_seq` but never stored can be handed out again after a crash, which is
harmless: nothing carried it.

Without a directory the outbox lives in memory (same interface, nothing survives the process).

An outbox written by fogfl 0.2.0 (one ``<seq>.msg`` file per pending message) is read once and
moved into the journal.
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
from kernel.journal import Journal, fsync_dir, read
from protos.envelope import Publish

log = logging.getLogger(__name__)

_MAGIC = b"FOGFLOB1"
Durability = Literal["sync", "async"]
DURABILITIES: tuple[str, ...] = ("sync", "async")
_LEGACY_SUFFIX = ".msg"
_PUT, _ACK = b"P", b"A"
_SEQ = struct.Struct(">Q")
COMPACT_BYTES = 1 << 20  # a journal past this is compacted at the next ack


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
        fsync_dir(path.parent)


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


def _replay(records: list[bytes], where: object) -> tuple[dict[int, Entry], dict[int, Entry]]:
    """Every message the journal records were put, and those of them still pending."""
    recorded: dict[int, Entry] = {}
    pending: dict[int, Entry] = {}
    for i, rec in enumerate(records):
        try:
            if rec[:1] == _PUT:
                e = _decode(rec[1:])
                recorded[e.seq] = pending[e.seq] = e
            elif rec[:1] == _ACK:
                pending.pop(_SEQ.unpack(rec[1:])[0], None)
            else:
                raise ValueError(f"unknown record kind {rec[:1]!r}")
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("outbox %s: journal record %d is unreadable (%s); skipped", where, i, exc)
    return recorded, pending


def read_outbox(directory: Path | str) -> tuple[list[Entry], list[Entry]]:
    """What an outbox directory holds, without opening it for writing (an edge may be running):
    ``(pending, recorded)``, each oldest first. Messages still in fogfl 0.2.0's ``.msg`` files
    are not included."""
    path = Path(directory) / "outbox.journal"
    recorded, pending = _replay(read(path), directory) if path.exists() else ({}, {})
    return [pending[s] for s in sorted(pending)], [recorded[s] for s in sorted(recorded)]


class Outbox:
    def __init__(self, directory: Path | str | None = None, durability: Durability = "sync",
                 compact_bytes: int = COMPACT_BYTES) -> None:
        if durability not in DURABILITIES:
            raise ConfigError(f"unknown outbox durability {durability!r}; use one of {', '.join(DURABILITIES)}")
        self.directory = Path(directory) if directory is not None else None
        self.durability = durability
        self.compact_bytes = compact_bytes
        self._lock = threading.Lock()
        self._entries: dict[int, Entry] = {}  # pending
        self._recorded: dict[int, Entry] = {}  # every put in the journal (pending or acknowledged)
        self._unsynced: set[int] = set()  # put without a sync ("async"), not yet synced
        self._next = 1
        self._journal: Journal | None = None
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
                self._next = max(1, int(seq_file.read_text().strip()))
            except ValueError:
                log.warning("outbox %s: unreadable seq file; continuing after the highest stored seq",
                            self.directory)
        try:
            self._journal = Journal(self.directory / "outbox.journal")
        except ValueError as exc:
            raise ConfigError(f"outbox {self.directory}: {exc}; move it away to start afresh") from None
        self._recorded, self._entries = _replay(self._journal.records, self.directory)
        self._journal.records = []
        self._load_legacy()
        if self._recorded:
            self._next = max(self._next, max(self._recorded) + 1)
        if self._entries:
            log.info("outbox %s: %d message(s) pending from an earlier run", self.directory, len(self._entries))

    def _load_legacy(self) -> None:
        """Messages a fogfl 0.2.0 outbox left as one file each: into the journal, then removed."""
        assert self.directory is not None and self._journal is not None
        moved = []
        for path in sorted(self.directory.glob(f"*{_LEGACY_SUFFIX}")):
            try:
                entry = _decode(path.read_bytes())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                bad = path.with_suffix(".corrupt")
                log.warning("outbox %s: %s is unreadable (%s); moved aside to %s", self.directory, path.name,
                            exc.__class__.__name__, bad.name)
                path.replace(bad)
                continue
            if entry.seq not in self._recorded:
                self._journal.append(_PUT + _encode(entry), sync=False)
                self._recorded[entry.seq] = self._entries[entry.seq] = entry
            moved.append(path)
        if moved:
            self._journal.sync()
            for path in moved:
                path.unlink()
            log.info("outbox %s: %d message(s) moved from .msg files into the journal", self.directory, len(moved))

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

    def put(self, seq: int, msg: Publish) -> Entry:
        """Store ``msg`` under ``seq`` until :meth:`ack`: on stable storage ("sync"), or written
        and made durable by the next :meth:`sync` ("async"). An OSError (a full disk) stores
        nothing."""
        entry = Entry(seq, msg)
        with self._lock:
            if self._journal is not None:
                durable = self.durability == "sync"
                self._journal.append(_PUT + _encode(entry), sync=durable)
                if not durable:
                    self._unsynced.add(seq)
                self._recorded[seq] = entry
            self._entries[seq] = entry
        return entry

    @property
    def unsynced(self) -> int:
        """Entries stored but not yet synced (only with ``durability="async"``)."""
        with self._lock:
            return len(self._unsynced)

    def sync(self) -> int:
        """Make every stored entry durable (one ``fdatasync`` for all of them). Returns how many
        entries it synced."""
        with self._lock:
            n = len(self._unsynced)
            if not n or self._journal is None:
                return 0
            self._journal.sync()
            self._unsynced.clear()
            return n

    def ack(self, seq: int) -> bool:
        """The broker acknowledged ``seq``: it is no longer pending. False if it was not. The
        ack record is not synced: one that a power cut loses only makes the message go again,
        and receivers drop it as a duplicate."""
        with self._lock:
            entry = self._entries.pop(seq, None)
            self._unsynced.discard(seq)  # the broker has it: no need to sync it any more
            if entry is not None and self._journal is not None:
                try:
                    self._journal.append(_ACK + _SEQ.pack(seq), sync=False)
                except OSError as exc:  # a full disk: after a restart the message goes again, a duplicate
                    log.warning("outbox %s: could not record the ack of seq %d (%s); it will be sent again "
                                "after a restart", self.directory, seq, exc.strerror or exc)
            return entry is not None

    def recorded(self) -> list[Entry]:
        """Every message stored since the last compaction, acknowledged or not, oldest first."""
        with self._lock:
            return [self._recorded[s] for s in sorted(self._recorded)]

    @property
    def needs_compaction(self) -> bool:
        return self._journal is not None and self._journal.size > self.compact_bytes

    def compact(self, counter_saved: bool = False) -> None:
        """Rewrite the journal with the pending entries only, dropping the acknowledged ones from
        :meth:`recorded`. A caller that reads :meth:`recorded` on restart saves what it needs of
        them first. The counter is written first, unless ``counter_saved``: the caller made a
        sequence number at least :attr:`next` durable itself (and restores it with :meth:`advance`)."""
        with self._lock:
            if self._journal is None:
                return
            if not counter_saved:
                atomic_write(self.directory / "seq", f"{self._next}\n".encode())  # type: ignore[operator]
            self._journal.rewrite(_PUT + _encode(self._entries[s]) for s in sorted(self._entries))
            self._recorded = dict(self._entries)
            self._unsynced.clear()  # the rewrite synced them

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

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
