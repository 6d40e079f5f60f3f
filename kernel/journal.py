"""An append-only record file: how the edge's outbox and the fog's sample pool keep what they
must not lose with one write and at most one ``fdatasync`` per record.

A record is appended as ``length (4 bytes, big-endian) | crc32 (4 bytes) | bytes``; the file starts
with the magic ``FOGFLJ1\\n``. Opening a journal reads every record back. A crash can leave only
the last record half-written (appends go at the end): reading stops at the first record whose
length runs past the end of the file or whose checksum does not match, the file is cut back to
the last good record, and what was cut is kept beside it as ``<name>.torn`` for inspection.

``append(record, sync=True)`` returns once the record is on stable storage (``fdatasync``: the
size change is flushed with the data). ``sync=False`` leaves it in the OS page cache: a crashed
process loses nothing, a power cut may. :meth:`rewrite` replaces the whole file atomically (temp
file, fsync, rename, directory fsync), which is how a journal is compacted.

Why not one file per record: a file written atomically costs a temp file, an fsync, a rename and
a directory fsync, and removing it another directory update. On the 2-core test machine those
were about 0.4 ms of CPU per edge batch plus the fsync latency on the round's critical path (see
``docs/benchmarks.md``); on an SD card every fsync is also wear.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"FOGFLJ1\n"
_HEAD = struct.Struct(">II")  # length, crc32
MAX_RECORD = 1 << 30

_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a created or renamed file) durable, where the OS allows it."""
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


def frame(record: bytes | bytearray | memoryview) -> bytes:
    return _HEAD.pack(len(record), zlib.crc32(record)) + bytes(record)


def parse(data: bytes, name: object = "journal") -> tuple[list[bytes], int]:
    """The whole records in ``data`` (a journal file's bytes) and where they end. ValueError if
    ``data`` is not a journal."""
    if not data.startswith(MAGIC):
        raise ValueError(f"{name} is not a fogfl journal (bad magic)")
    records: list[bytes] = []
    pos = len(MAGIC)
    while pos + _HEAD.size <= len(data):
        length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if length > MAX_RECORD or end > len(data):
            break
        record = data[pos + _HEAD.size:end]
        if zlib.crc32(record) != crc:
            break
        records.append(record)
        pos = end
    return records, pos


def read(path: Path | str) -> list[bytes]:
    """The whole records of a journal, read only (a journal another process is writing may end
    in a record still being written: it is left out, and the file is not touched)."""
    return parse(Path(path).read_bytes(), path)[0]


class Journal:
    """Append-only records in ``path`` (created if missing). ``records`` holds what the file held
    when opened, in order. Thread-safe."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.records: list[bytes] = []
        created = not self.path.exists()
        if created:
            with open(self.path, "wb") as f:
                f.write(MAGIC)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(self.path.parent)
        else:
            self._read()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = os.fstat(self._fd).st_size
        self._dirty = False

    def _read(self) -> None:
        data = self.path.read_bytes()
        self.records, pos = parse(data, self.path)
        if pos < len(data):
            torn = self.path.with_name(self.path.name + ".torn")
            torn.write_bytes(data[pos:])
            with open(self.path, "r+b") as f:
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())
            log.warning("journal %s: %d byte(s) after record %d were incomplete or damaged (a write cut short); "
                        "cut off, kept in %s", self.path, len(data) - pos, len(self.records), torn.name)

    def append(self, record: bytes | bytearray | memoryview, sync: bool = True) -> None:
        data = frame(record)
        with self._lock:
            written = os.write(self._fd, data)
            if written != len(data):  # a full disk part-way: undo, so the journal stays whole
                os.ftruncate(self._fd, self.size)
                raise OSError(28, f"short write to {self.path} ({written} of {len(data)} bytes)")
            self.size += written
            if sync:
                _datasync(self._fd)
                self._dirty = False
            else:
                self._dirty = True

    def sync(self) -> bool:
        """Flush appends made with ``sync=False``. True if there was anything to flush."""
        with self._lock:
            if not self._dirty:
                return False
            _datasync(self._fd)
            self._dirty = False
            return True

    def rewrite(self, records: Iterable[bytes | bytearray | memoryview]) -> None:
        """Replace the journal's content with ``records``, atomically and durably."""
        with self._lock:
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(MAGIC)
                for r in records:
                    f.write(frame(r))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            self.size = os.fstat(self._fd).st_size
            self._dirty = False

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
