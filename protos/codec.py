"""Tensor codec and chunked streaming of payloads.

A payload is a serialized ``TensorSet``. It travels as a header chunk, 1 MiB data chunks and a
trailer carrying a digest of the concatenated data, so gRPC's 4 MiB message limit never decides
whether a model can move. The digest is XXH3-128: it is there to catch damage (a truncated or
reordered stream, a corrupted buffer), and being sent with the data it cannot authenticate
anything whatever the hash (TLS does that). Every byte is hashed at both ends, so its speed
counts: sha256 (~1.1 GB/s here) cost as much CPU as the gRPC transfer itself, BLAKE3 (~5 GB/s)
still ~10 ms per end of a 51 MB model, XXH3-128 (~30 GB/s) ~1.5 ms (docs/benchmarks.md).

Two ways to put a stream on the wire, byte for byte the same protobuf:

- :func:`iter_chunks` / :func:`assemble_chunks` work on ``pb.Chunk`` messages (generated stubs).
- :func:`chunk_frames` yields the serialized messages themselves, a data chunk hand-encoded (tag
  0x1A, varint length, bytes) with a single copy, for a gRPC method registered with an identity
  serializer; :func:`parse_chunk` is the matching deserializer, which turns a data chunk into a
  zero-copy ``memoryview`` of its bytes. :func:`assemble_chunks` accepts those views as data chunks.

A receiver either copies each chunk as it arrives into one buffer of the size the header
announced (reused from a small pool: :class:`_PayloadBuffer`, :class:`_BufferPool`), or keeps the
chunks where gRPC put them (``receive_stream(chunked=True)``: :class:`ChunkedPayload`, no copy at
all; the cloud does this with uploads). Either way each chunk is hashed and its float values are
checked for NaN/inf while it is in cache (gRPC keeps receiving meanwhile); nothing is left to do
after the trailer but compare digests. :func:`decode_tensors` reads the canonical encoding in
place (``copy=False``: read-only views, no copy at all). Each of protobuf message construction, a
``bytes(memoryview)`` slice, ``bytearray`` growth plus a final ``bytes()``, or a join of the chunks
at the end would be a full copy of a 50 MB model on the critical path; these paths make none
beyond the one into the buffer, and the chunked one none.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash
from google.protobuf.unknown_fields import UnknownFieldSet
from scipy.linalg.blas import ddot, sdot

from protos import fogfl_pb2 as pb
from protos.blas import one_blas_thread
from protos.errors import ChecksumError, WireError

CHUNK_SIZE = 1 << 20  # 1 MiB
MAX_PAYLOAD_BYTES = 2 << 30  # refuse anything claiming more than 2 GiB
_ALLOWED_DTYPES = {"float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool"}
_DATA_TAG = 0x1A  # Chunk.data: field 3, wire type 2 (length-delimited)


# --------------------------------------------------------------------------- tensors


def tensor_to_pb(name: str, array: np.ndarray) -> pb.Tensor:
    arr = np.asarray(array)  # not ascontiguousarray: it turns a 0-d array into shape (1,)
    if arr.dtype.name not in _ALLOWED_DTYPES:
        raise WireError(f"tensor {name!r}: dtype {arr.dtype.name} is not supported on the wire")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return pb.Tensor(name=name, shape=list(arr.shape), dtype=arr.dtype.name, data=arr.tobytes())


def _checked_shape(name: str, shape_in: Iterable[int], dtype_name: str, nbytes: int) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, little-endian dtype) of a tensor header, checked against its ``nbytes`` of data."""
    if dtype_name not in _ALLOWED_DTYPES:
        raise WireError(f"tensor {name!r}: unknown dtype {dtype_name!r}")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    shape = tuple(int(s) for s in shape_in)
    if any(s < 0 for s in shape):
        raise WireError(f"tensor {name!r}: negative dimension in shape {shape}")
    expected = math.prod(shape) * dtype.itemsize  # python ints: a hostile shape cannot overflow
    if expected != nbytes:
        raise WireError(f"tensor {name!r}: shape {shape} {dtype_name} needs {expected} bytes, got {nbytes}")
    return shape, dtype


def _array(name: str, shape_in: Iterable[int], dtype_name: str, data, offset: int, nbytes: int,
           copy: bool, aligned: bool = True) -> np.ndarray:
    """The array of one tensor whose raw bytes are ``data[offset : offset + nbytes]``."""
    shape, dtype = _checked_shape(name, shape_in, dtype_name, nbytes)
    # frombuffer gives a read-only view of the message's bytes; copy so callers own the array.
    try:
        arr = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
    except ValueError:  # e.g. an empty tensor whose other dimensions exceed numpy's limits
        raise WireError(f"tensor {name!r}: shape {shape} is not representable") from None
    native = dtype.newbyteorder("=")
    if copy or arr.dtype != native or (aligned and not arr.flags.aligned):
        return arr.astype(native, copy=True)
    return arr


def tensor_from_pb(t: pb.Tensor) -> np.ndarray:
    data = t.data
    return _array(t.name, t.shape, t.dtype, data, 0, len(data), copy=True)


ALIGN = 64  # where encode_tensors puts each tensor's data: a multiple of this from the payload's start


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Serialize named arrays (order kept) into TensorSet bytes, each tensor's data starting at a
    multiple of :data:`ALIGN` bytes from the start.

    Each ``Tensor`` is written as protobuf would (name, shape, dtype), then a ``pad`` field of
    zeros, then ``data``: any protobuf parser reads it (fields may come in any order), and a
    receiver's views of the data are aligned for every dtype wherever its buffer is 64-byte
    aligned (and for float32 in a gRPC message buffer), so NaN/inf checks and reductions run on
    aligned memory (an unaligned float32 min/max reduction is ~2.5x slower here: numpy copies
    it through a buffer) and decoding need not copy to align. At most ``ALIGN + 1`` bytes per tensor."""
    parts: list[bytes | memoryview] = []
    pos = 0
    for name, value in tensors.items():
        arr = np.asarray(value)  # not ascontiguousarray: it turns a 0-d array into shape (1,)
        if arr.dtype.name not in _ALLOWED_DTYPES:
            raise WireError(f"tensor {name!r}: dtype {arr.dtype.name} is not supported on the wire")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr) if arr.ndim else arr.reshape(1).copy()
        head = pb.Tensor(name=name, shape=list(np.shape(value)), dtype=arr.dtype.name).SerializeToString()
        data_key = b"\x22" + _varint(arr.nbytes)
        for k in range(-1, ALIGN):  # -1: no pad field at all
            pad = b"" if k < 0 else b"\x2a" + _varint(k) + bytes(k)
            body = len(head) + len(pad) + len(data_key) + arr.nbytes
            outer = b"\x0a" + _varint(body)
            if (pos + len(outer) + len(head) + len(pad) + len(data_key)) % ALIGN == 0:
                break
        parts += [outer, head, pad, data_key, memoryview(arr.reshape(-1)).cast("B") if arr.size else b""]
        pos += len(outer) + body
    return b"".join(parts)


def decode_tensors(payload: bytes | memoryview | ChunkedPayload, *, copy: bool = True,
                   aligned: bool = True) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_tensors`. Raises WireError on anything malformed.

    The canonical encoding (what :func:`encode_tensors` writes) is read in place: one copy of the
    data per tensor, none of protobuf's. Any other valid or invalid encoding goes through the
    protobuf parser, so values and errors are the same either way.

    ``copy=False`` returns read-only views into ``payload`` instead of owned arrays, for a reader
    that only reads; a tensor whose bytes are not aligned for its dtype (BLAS wants that) is still
    copied unless ``aligned=False``: numpy's element-wise loops and reductions handle unaligned
    views correctly and, on x86-64 and aarch64, as fast (measured: sum and copy of 12.7 M float32
    within 10 %), so a reader that only reduces and adds, like the cloud's aggregation, skips it.
    """
    if isinstance(payload, ChunkedPayload):
        return payload.tensors(copy=copy, aligned=aligned)
    spans = _scan_tensor_set(payload)
    if spans is None:
        return _parse_tensors(payload if isinstance(payload, bytes) else bytes(payload), copy)
    out: dict[str, np.ndarray] = {}
    for name, shape, dtype_name, offset, nbytes in spans:
        if name in out:
            raise WireError(f"tensor {name!r} appears twice in the payload")
        out[name] = _array(name, shape, dtype_name, payload, offset, nbytes, copy=copy, aligned=aligned)
    return out


def _parse_tensors(payload: bytes, copy: bool) -> dict[str, np.ndarray]:
    ts = pb.TensorSet()
    try:
        ts.ParseFromString(payload)
    except Exception as exc:  # protobuf raises DecodeError, sometimes others on garbage
        raise WireError(f"payload is not a TensorSet ({exc.__class__.__name__})") from None
    # protobuf skips fields it does not know, so some garbage parses as an empty set: refuse it.
    if len(UnknownFieldSet(ts)) or any(len(UnknownFieldSet(t)) for t in ts.tensors):
        raise WireError("payload is not a TensorSet (unknown fields)")
    out: dict[str, np.ndarray] = {}
    for t in ts.tensors:
        if t.name in out:
            raise WireError(f"tensor {t.name!r} appears twice in the payload")
        data = t.data
        out[t.name] = _array(t.name, t.shape, t.dtype, data, 0, len(data), copy=copy)
    return out


class _Short(ValueError):
    """The bytes at hand end before the structure being read does (more may still arrive)."""


def read_varint(buf: bytes | memoryview, pos: int, end: int, avail: int | None = None) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at ``pos``; ValueError if it runs past ``end``
    or is longer than 10 bytes, :class:`_Short` if it runs past ``avail`` (the bytes received so
    far, when fewer than ``end``) first."""
    avail = end if avail is None else min(avail, end)
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("bad varint")
        if pos >= avail:
            raise _Short
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _tensor_header(buf: bytes | memoryview, pos: int, end: int,
                   avail: int) -> tuple[str, list[int], str, int, int, int] | None:
    """The ``Tensor`` message at ``pos`` of a TensorSet of ``end`` bytes, ``avail`` of them at hand,
    in the canonical encoding (what protobuf serializes: fields in number order, each at most once,
    shape packed; ``data`` is the last field, optionally preceded by ``pad``, as
    :func:`encode_tensors` writes it): (name, shape, dtype, data offset, data length, end of
    the message). None if the encoding is not the canonical one; :class:`_Short` if the header
    (everything before the data) is not all at hand yet. ValueError / UnicodeDecodeError on garbage."""
    if pos >= avail:
        raise _Short
    if buf[pos] != 0x0A:  # TensorSet.tensors, length-delimited
        return None
    length, pos = read_varint(buf, pos + 1, end, avail)
    stop = pos + length
    if stop > end:
        return None
    name, dtype_name, shape = "", "", []
    data_at = data_len = 0
    last_field = 0
    while pos < stop:
        if pos >= avail:
            raise _Short
        tag = buf[pos]
        field, wire = tag >> 3, tag & 7
        if wire != 2 or not 1 <= field <= 5:
            return None
        if field == 5:  # pad: once, after name/shape/dtype and right before the data
            ok = last_field < 4
        elif field == 4:  # data: last
            ok = last_field != 4
        else:
            ok = last_field < field
        if not ok:
            return None
        last_field = field
        length, pos = read_varint(buf, pos + 1, stop, avail)
        nxt = pos + length
        if nxt > stop:
            return None
        if field == 5:
            if nxt > avail:
                raise _Short
        elif field == 4:
            data_at, data_len = pos, length  # the data need not be at hand
        elif nxt > avail:
            raise _Short
        elif field == 1:
            name = bytes(buf[pos:nxt]).decode("utf-8")
        elif field == 2:
            p = pos
            while p < nxt:
                dim, p = read_varint(buf, p, nxt)
                if dim >= 1 << 63:  # a negative int64: the full parser reports it
                    return None
                shape.append(dim)
        else:
            dtype_name = bytes(buf[pos:nxt]).decode("utf-8")
        pos = nxt
    return name, shape, dtype_name, data_at, data_len, stop


def _scan_tensor_set(payload: bytes | memoryview) -> list[tuple[str, list[int], str, int, int]] | None:
    """Locate each tensor of a TensorSet in its canonical encoding: (name, shape, dtype, data
    offset, data length). None for anything else, which the caller hands to the protobuf parser."""
    buf = memoryview(payload).cast("B")
    end = len(buf)
    pos = 0
    out = []
    try:
        while pos < end:
            found = _tensor_header(buf, pos, end, end)
            if found is None:
                return None
            out.append(found[:5])
            pos = found[5]
    except (ValueError, UnicodeDecodeError):
        return None
    return out


_FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})


_DOT = {np.dtype(np.float32): sdot, np.dtype(np.float64): ddot}


def all_finite(values: np.ndarray) -> bool:
    """No NaN or infinity in ``values``.

    Contiguous float32/float64 values first go through one BLAS pass, ``x . x`` on the calling
    thread (:func:`protos.blas.one_blas_thread`): a NaN or an infinity makes it NaN or +inf, and
    squares cannot cancel, so a finite result settles it. A non-finite one (a NaN or an infinity,
    or finite values whose squares overflow, |x| > 1.8e19 in float32) goes to the exact check,
    ``np.minimum``/``np.maximum``: they propagate NaN, and an infinity is the minimum or the
    maximum. Per MiB of float32 in cache: ~16 us for the dot, ~29 us for the two reductions; on
    a 51 MB download the fog's receiving thread 8.3-8.8 -> 7.5-7.7 ms (docs/benchmarks.md,
    session 8)."""
    if values.size == 0:
        return True
    dot = _DOT.get(values.dtype)
    if dot is not None and values.flags.c_contiguous and values.flags.aligned:
        flat = values.reshape(-1)
        with one_blas_thread():
            if math.isfinite(dot(flat, flat)):
                return True
    return bool(np.isfinite(np.minimum.reduce(values, axis=None)) and np.isfinite(np.maximum.reduce(values, axis=None)))


class _Pieces:
    """A payload as the byte pieces it is made of, read where they lie: one buffer being filled
    (a single piece), or the chunks of a stream as they arrived (each a view of a gRPC message)."""

    def __init__(self) -> None:
        self.views: list[memoryview] = []
        self.starts: list[int] = []
        self.size = 0

    def append(self, view: memoryview) -> None:
        if not len(view):
            return  # starts stay strictly increasing
        self.starts.append(self.size)
        self.views.append(view)
        self.size += len(view)

    def index(self, pos: int) -> int:
        """The piece holding byte ``pos``."""
        return bisect.bisect_right(self.starts, pos) - 1

    def window(self, pos: int, stop: int) -> bytes | memoryview:
        """Bytes ``[pos, stop)``: a view when one piece holds them, else a (small) join."""
        i = self.index(pos)
        v, s = self.views[i], self.starts[i]
        if stop <= s + len(v):
            return v[pos - s : stop - s]
        parts = []
        while pos < stop:
            v, s = self.views[i], self.starts[i]
            part = v[pos - s : min(stop, s + len(v)) - s]
            parts.append(part)
            pos += len(part)
            i += 1
        return b"".join(parts)

    def spans(self, start: int, stop: int) -> Iterator[tuple[memoryview, int, int]]:
        """(piece, offset in it, length) covering ``[start, stop)`` in order."""
        i = self.index(start) if stop > start else len(self.views)
        while start < stop:
            v, s = self.views[i], self.starts[i]
            n = min(stop, s + len(v)) - start
            if n > 0:
                yield v, start - s, n
                start += n
            i += 1

    def gather(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Bytes ``[start, stop)`` in ``out`` (uint8, that long), or in a new array."""
        out = np.empty(stop - start, dtype=np.uint8) if out is None else out
        at = 0
        for v, off, n in self.spans(start, stop):
            out[at : at + n] = np.frombuffer(v, dtype=np.uint8, count=n, offset=off)
            at += n
        return out


_HEADER_WINDOWS = (256, 4096, 65536)  # a Tensor header longer than 64 KiB is not followed


class _FiniteScan:
    """Follows a TensorSet's canonical encoding while its bytes arrive and checks each float
    tensor for NaN and infinity on the part that just arrived (still in cache), where it lies: in
    one buffer or across a stream's chunks (an element split between two chunks is checked from a
    4- or 8-byte join). Records where every tensor is (:attr:`layout`). :attr:`nonfinite` is the set
    of tensor names holding NaN or infinity, or None if the payload was not followed to its end
    (not canonical, or not complete): a reader must then check for itself."""

    def __init__(self, pieces: _Pieces, total: int) -> None:
        self._pieces = pieces
        self._end = total
        self._pos = 0  # start of the next Tensor message
        self._cur: tuple[str, np.dtype, int, int] | None = None  # name, dtype, next unchecked byte, data end
        self._bad: set[str] = set()
        self._failed = False
        self.layout: list[tuple[str, list[int], str, int, int]] = []

    def _header(self, avail: int) -> tuple[str, list[int], str, int, int, int] | None:
        for size in _HEADER_WINDOWS:
            stop = min(avail, self._pos + size)
            window = self._pieces.window(self._pos, stop)
            try:
                found = _tensor_header(window, 0, self._end - self._pos, len(window))
            except _Short:
                if stop == avail:
                    raise
                continue
            if found is None:
                return None
            name, shape, dtype_name, data_at, data_len, nxt = found
            return name, shape, dtype_name, data_at + self._pos, data_len, nxt + self._pos
        return None

    def _check(self, name: str, dtype: np.dtype, start: int, stop: int) -> None:
        """Check the elements in ``[start, stop)`` (both on element boundaries)."""
        item = dtype.itemsize
        pieces = self._pieces
        pos = start
        while pos < stop:
            i = pieces.index(pos)
            v, s = pieces.views[i], pieces.starts[i]
            piece_end = s + len(v)
            whole = (min(stop, piece_end) - pos) // item
            if whole:
                if not all_finite(np.frombuffer(v, dtype=dtype, count=whole, offset=pos - s)):
                    self._bad.add(name)
                pos += whole * item
            if pos < stop and pos + item > piece_end:  # one element split between pieces
                if not all_finite(np.frombuffer(pieces.window(pos, pos + item), dtype=dtype)):
                    self._bad.add(name)
                pos += item

    def advance(self, avail: int) -> None:
        """Bytes ``[0, avail)`` of the payload are at hand."""
        try:
            while not self._failed:
                if self._cur is None:
                    if self._pos >= self._end:
                        return
                    found = self._header(avail)  # _Short: wait for more
                    if found is None:
                        self._failed = True
                        return
                    name, shape, dtype_name, data_at, data_len, self._pos = found
                    self.layout.append((name, shape, dtype_name, data_at, data_len))
                    if dtype_name in _FLOAT_DTYPES:
                        dtype = np.dtype(dtype_name).newbyteorder("<")
                        if data_len % dtype.itemsize:
                            self._failed = True  # decode_tensors refuses it with a proper message
                            return
                        self._cur = (name, dtype, data_at, data_at + data_len)
                    continue
                name, dtype, checked, data_end = self._cur
                upto = min(avail, data_end)
                upto -= (upto - checked) % dtype.itemsize
                if upto > checked:
                    self._check(name, dtype, checked, upto)
                if upto < data_end:
                    self._cur = (name, dtype, upto, data_end)
                    return
                self._cur = None
        except _Short:
            return
        except (ValueError, UnicodeDecodeError):
            self._failed = True

    @property
    def complete(self) -> bool:
        return not self._failed and self._cur is None and self._pos == self._end

    @property
    def nonfinite(self) -> frozenset[str] | None:
        return frozenset(self._bad) if self.complete else None


# --------------------------------------------------------------------------- chunk streams


def sha256_hex(data: bytes | memoryview) -> str:
    """sha256 hex digest: the edge model's and the capture format's identity of a payload."""
    return hashlib.sha256(data).hexdigest()


def payload_digest(data: bytes | memoryview) -> str:
    """XXH3-128 hex digest: what a chunk stream's trailer carries for its payload."""
    return xxhash.xxh3_128_hexdigest(data)


def iter_chunks(header: pb.Chunk, payload: bytes | memoryview, chunk_size: int = CHUNK_SIZE,
                digest: str | None = None) -> Iterator[pb.Chunk]:
    """Yield ``header``, the payload in ``chunk_size`` pieces, then the digest trailer.

    ``digest`` is the payload's :func:`payload_digest` if the caller already knows it (e.g. a model
    served repeatedly); otherwise it is computed while the chunks go out."""
    yield header
    view = memoryview(payload).cast("B")
    running = None if digest else xxhash.xxh3_128()
    for start in range(0, len(view), chunk_size):
        piece = view[start : start + chunk_size]
        if running is not None:
            running.update(piece)
        yield pb.Chunk(data=bytes(piece))
    yield pb.Chunk(trailer=pb.Trailer(xxh3_128=digest or running.hexdigest()))  # type: ignore[union-attr]


def _data_prefix(n: int) -> bytes:
    return bytes((_DATA_TAG,)) + _varint(n)


def encode_data_chunk(piece: bytes | memoryview) -> bytes:
    """``pb.Chunk(data=piece).SerializeToString()``, byte for byte, with one copy of ``piece``."""
    return _data_prefix(len(piece)) + piece


def chunk_frames(header: pb.Chunk, payload: bytes | memoryview, chunk_size: int = CHUNK_SIZE,
                 digest: str | None = None) -> Iterator[bytes]:
    """The serialized messages of :func:`iter_chunks` (same bytes), for a gRPC method whose
    serializer passes bytes through. ``digest``: the payload's digest if known; otherwise each
    chunk is hashed just before it goes out (measured on a 51 MB upload between two processes:
    +4 ms over a bare stream, against +10 ms for hashing the whole payload on a helper thread
    meanwhile, which competes with gRPC's own threads for the cores)."""
    yield header.SerializeToString()
    view = memoryview(payload).cast("B")
    running = None if digest else xxhash.xxh3_128()
    prefix = _data_prefix(chunk_size)
    for start in range(0, len(view), chunk_size):
        piece = view[start : start + chunk_size]
        if running is not None:
            running.update(piece)
        yield (prefix if len(piece) == chunk_size else _data_prefix(len(piece))) + piece
    yield pb.Chunk(trailer=pb.Trailer(xxh3_128=digest or running.hexdigest())).SerializeToString()  # type: ignore[union-attr]


def parse_chunk(raw: bytes) -> pb.Chunk | memoryview:
    """gRPC deserializer of a ``Chunk``: a message that is exactly one ``data`` field comes back as
    a read-only view of those bytes inside ``raw`` (no copy); any other message as ``pb.Chunk``."""
    if raw and raw[0] == _DATA_TAG:
        try:
            length, pos = read_varint(raw, 1, min(len(raw), 11))
        except ValueError:
            length, pos = -1, 0
        if pos + length == len(raw):
            return memoryview(raw)[pos:]
    return pb.Chunk.FromString(raw)


def serialize_chunk(item: pb.Chunk | bytes) -> bytes:
    """gRPC serializer matching :func:`chunk_frames`: bytes pass through, messages serialize."""
    return item if isinstance(item, bytes) else item.SerializeToString()


class _BufferPool:
    """Receive buffers, reused once nothing refers to them any more.

    A fog downloads a model of the same size every round and the cloud receives updates of the
    same size from every fog, so the buffer of the previous transfer usually fits the next. A
    freshly mapped buffer costs a page fault per 4 KiB page on its first write (measured: ~10 ms
    of CPU for 51 MB here, as much as the copy itself); a reused one costs none. A buffer is
    handed out again only when the pool holds the sole reference to it: every payload view,
    array or tensor made from a received payload keeps its buffer referenced (through the
    ``memoryview`` the payload is), so a buffer still in use is never reused. At most
    ``max_buffers`` are kept; beyond that the least recently used are let go (in use or not: the
    pool only stops keeping them)."""

    def __init__(self, max_buffers: int = 4, min_bytes: int = CHUNK_SIZE) -> None:
        self.max_buffers = max_buffers
        self.min_bytes = min_bytes
        self._lock = threading.Lock()
        self._buffers: list[np.ndarray] = []
        self.reused = 0

    def take(self, size: int) -> np.ndarray:
        if size < self.min_bytes:
            return np.empty(size, dtype=np.uint8)
        with self._lock:
            bufs = self._buffers
            for i in range(len(bufs)):
                # 2 references: the pool's list and getrefcount's argument -> nobody else has it
                if bufs[i].nbytes == size and sys.getrefcount(bufs[i]) == 2:
                    arr = bufs.pop(i)
                    bufs.append(arr)  # most recently used last
                    self.reused += 1
                    return arr
            arr = np.empty(size, dtype=np.uint8)
            bufs.append(arr)
            del bufs[: max(0, len(bufs) - self.max_buffers)]
            return arr


_POOL = _BufferPool()


class ChunkedPayload:
    """A received payload kept as the chunks it arrived in: views of gRPC's message buffers, no
    copy made. Verified like any received payload (size, digest, finiteness while it arrived).

    :func:`decode_tensors` reads it directly: a tensor inside one chunk is a view of it (or its
    copy), a tensor spread over chunks is gathered into its own new array, which is the one copy a
    caller that asks for owned arrays (``copy=True``) gets anyway. :meth:`shapes` answers names,
    shapes and dtypes without reading any values. :meth:`contiguous` joins the chunks into one
    buffer (once, on demand) for a reader that needs the bytes in one piece."""

    def __init__(self, pieces: _Pieces, layout: list[tuple[str, list[int], str, int, int]] | None) -> None:
        self._pieces = pieces
        self.layout = layout  # (name, shape, dtype, data offset, data length); None if not canonical
        self._joined: memoryview | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._pieces.size

    def __bytes__(self) -> bytes:
        return bytes(self.contiguous())

    @property
    def chunks(self) -> int:
        return len(self._pieces.views)

    def contiguous(self) -> memoryview:
        """The payload in one read-only buffer (joined on the first call, then kept)."""
        with self._lock:
            if self._joined is None:
                arr = self._pieces.gather(0, len(self), out=_POOL.take(len(self)))
                self._joined = memoryview(arr).cast("B").toreadonly()
            return self._joined

    def shapes(self) -> dict[str, TensorShape] | None:
        """Name -> (shape, dtype) of every tensor, without reading values; None if the payload is
        not canonically encoded (decode it to learn more)."""
        if self.layout is None:
            return None
        out: dict[str, TensorShape] = {}
        for name, shape, dtype_name, _, nbytes in self.layout:
            if name in out:
                raise WireError(f"tensor {name!r} appears twice in the payload")
            dims, dtype = _checked_shape(name, shape, dtype_name, nbytes)
            out[name] = TensorShape(dims, dtype.newbyteorder("="))
        return out

    def tensors(self, copy: bool = True, aligned: bool = True) -> dict[str, np.ndarray]:
        if self.layout is None:
            return decode_tensors(self.contiguous(), copy=copy, aligned=aligned)
        out: dict[str, np.ndarray] = {}
        for name, shape, dtype_name, offset, nbytes in self.layout:
            if name in out:
                raise WireError(f"tensor {name!r} appears twice in the payload")
            spans = list(self._pieces.spans(offset, offset + nbytes))
            if len(spans) == 1:
                view, at, _ = spans[0]
                out[name] = _array(name, shape, dtype_name, view, at, nbytes, copy=copy, aligned=aligned)
            else:  # spread over chunks (or empty): gathered into a new array, owned by the caller
                out[name] = _array(name, shape, dtype_name, self._pieces.gather(offset, offset + nbytes), 0, nbytes,
                                   copy=False, aligned=aligned)
        return out


@dataclass(frozen=True)
class TensorShape:
    """What a tensor is, without its values: enough for name, shape and dtype checks."""

    shape: tuple[int, ...]
    dtype: np.dtype


class _PayloadBuffer:
    """Where a received payload lands. Each chunk is hashed and, where it holds float tensor
    values, checked for NaN and infinity (:class:`_FiniteScan`) as it arrives, while it is still in
    cache; nothing is left for after the trailer but comparing digests. Either the chunks are kept
    where gRPC put them (``chunked``: :class:`ChunkedPayload`, no copy at all) or each is copied
    into one buffer of the announced size taken up front from :class:`_BufferPool`.

    The copy is the largest part of what a receiver does beyond a bare stream (~4.5 ms per 51 MB,
    ~8.7 ms in a profile of the receiving thread, whose source bytes are cold). Measured on the
    51 MB transfer benchmark, interleaved: the cloud keeping an upload's chunks (its fold worker
    reads them after the ack) 0.80-0.87x of a bare stream, copying 0.72-0.77x. A fog keeping a
    download's chunks was slower than copying (0.67-0.72x against 0.76-0.86x): held until decoded,
    gRPC's message buffers are not reused, and each 51 MB download took ~12 000 more page faults.
    A helper thread for the copy and the hash was tried earlier: on 2 cores it cost ~4.5 ms more
    CPU per transfer for no wall-clock gain."""

    def __init__(self, total: int, chunked: bool = False) -> None:
        self.total = total
        self.chunked = chunked
        self._pieces = _Pieces()
        if not chunked:
            self._arr = _POOL.take(total)
            self._buf = memoryview(self._arr).cast("B")
            self._pieces.append(self._buf)
        self._hash = xxhash.xxh3_128()
        self._scan = _FiniteScan(self._pieces, total)
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        offset, self.size = self.size, self.size + len(data)
        if self.chunked:
            view = data if isinstance(data, memoryview) else memoryview(data)  # bytes: format "B"
            self._pieces.append(view)
            self._hash.update(view)
        else:
            piece = self._arr[offset : self.size]
            np.copyto(piece, np.frombuffer(data, dtype=np.uint8))
            self._hash.update(piece)
        self._scan.advance(self.size)

    def finish(self) -> tuple[str, memoryview | ChunkedPayload, frozenset[str] | None]:
        """(hex digest, the payload, the names of float tensors holding NaN/inf or None) once every
        chunk is in. The payload is a read-only ``memoryview``, or a :class:`ChunkedPayload`."""
        assert self.size == self.total, "payload buffer read before it was complete"
        if self.chunked:
            payload: memoryview | ChunkedPayload = ChunkedPayload(
                self._pieces, self._scan.layout if self._scan.complete else None)
        else:
            payload = self._buf.toreadonly()
        return self._hash.hexdigest(), payload, self._scan.nonfinite


@dataclass(frozen=True)
class Received:
    """A chunk stream, received and verified."""

    header: Any  # pb.ModelHeader or pb.UpdateHeader
    # read-only, bytes-like (len, slicing, hashing, decode_tensors, bytes(...)); a ChunkedPayload
    # when received with ``chunked=True`` (len, decode_tensors, bytes(...), .contiguous())
    payload: memoryview | ChunkedPayload
    # names of the float tensors holding NaN or infinity, found while the bytes arrived; None when
    # the payload is not a canonically encoded TensorSet (a reader must check for itself)
    nonfinite: frozenset[str] | None


def receive_stream(chunks: Iterable[pb.Chunk | memoryview], header_field: str,
                   screen: Callable[[Any], str | None] | None = None, chunked: bool = False) -> Received:
    """Read a chunk stream back into its header and payload, checking order, size and the digest.

    ``header_field`` is ``"model_header"`` or ``"update_header"``. Data chunks may be ``pb.Chunk``
    messages or the views :func:`parse_chunk` returns. ``screen(header)``, if given, runs before
    anything is allocated or read past the header; a reason it returns refuses the stream
    (WireError), so a receiver that knows what it expects never reads, or reserves memory for,
    a payload it would reject anyway. ``chunked``: keep the chunks where they arrived instead of
    copying them into one buffer (the payload is then a :class:`ChunkedPayload`).
    """
    it = iter(chunks)
    try:
        first = next(it)
    except StopIteration:
        raise WireError("empty stream: no header chunk") from None
    first_kind = "data" if isinstance(first, memoryview) else first.WhichOneof("part")
    if first_kind != header_field:
        raise WireError(f"stream must start with {header_field}, got {first_kind}")
    header = getattr(first, header_field)
    total = int(header.total_bytes)
    if total > MAX_PAYLOAD_BYTES:
        raise WireError(f"header announces {total} bytes, above the {MAX_PAYLOAD_BYTES}-byte limit")
    if screen is not None and (reason := screen(header)):
        raise WireError(reason)
    buf = _PayloadBuffer(total, chunked=chunked)
    trailer = _receive_into(buf, it, total)
    computed, payload, nonfinite = buf.finish()
    if computed != trailer.xxh3_128:
        raise ChecksumError(f"xxh3-128 digest mismatch: computed {computed[:12]}…, trailer says "
                            f"{trailer.xxh3_128[:12] or 'nothing (a sender from fogfl 0.1?)'}…")
    return Received(header, payload, nonfinite)


def as_stream(header: pb.Chunk, data: bytes, trailer: pb.Trailer) -> list[pb.Chunk | memoryview]:
    """A single-message transfer (``ModelReply`` / ``UpdateRequest``) as the chunk stream it stands
    for, so :func:`receive_stream` checks it exactly as it checks a stream."""
    return [header, memoryview(data), pb.Chunk(trailer=trailer)]


def assemble_chunks(chunks: Iterable[pb.Chunk | memoryview], header_field: str) -> tuple[Any, memoryview]:
    """(header, payload) of a chunk stream: :func:`receive_stream` without the finiteness verdict."""
    got = receive_stream(chunks, header_field)
    return got.header, got.payload


def _receive_into(buf: _PayloadBuffer, it: Iterator[pb.Chunk | memoryview], total: int) -> pb.Trailer:
    """Feed the data chunks of a stream into ``buf``; the trailer, once the stream has ended."""
    trailer = None
    for chunk in it:
        if isinstance(chunk, memoryview):
            kind, data = "data", chunk
        else:
            kind = chunk.WhichOneof("part")
            data = chunk.data if kind == "data" else b""
        if trailer is not None:
            raise WireError("data after the trailer")
        if kind == "data":
            if buf.size + len(data) > total:
                raise WireError(f"stream carries more than the {total} bytes its header announced")
            buf.write(data)
        elif kind == "trailer":
            trailer = chunk.trailer  # type: ignore[union-attr]
        else:
            raise WireError(f"unexpected {kind} chunk inside a stream")
    if trailer is None:
        raise WireError("stream ended without a digest trailer (truncated)")
    if buf.size != total:
        raise WireError(f"stream carried {buf.size} bytes, header announced {total}")
    return trailer
