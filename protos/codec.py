"""Tensor codec and chunked streaming of payloads.

A payload is a serialized ``TensorSet``. It travels as a header chunk, 1 MiB data chunks and a
trailer carrying the sha256 of the concatenated data, so gRPC's 4 MiB message limit never decides
whether a model can move.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from google.protobuf.unknown_fields import UnknownFieldSet

from protos import fogfl_pb2 as pb
from protos.errors import ChecksumError, WireError

CHUNK_SIZE = 1 << 20  # 1 MiB
MAX_PAYLOAD_BYTES = 2 << 30  # refuse anything claiming more than 2 GiB
_ALLOWED_DTYPES = {"float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool"}


def tensor_to_pb(name: str, array: np.ndarray) -> pb.Tensor:
    arr = np.asarray(array)  # not ascontiguousarray: it turns a 0-d array into shape (1,)
    if arr.dtype.name not in _ALLOWED_DTYPES:
        raise WireError(f"tensor {name!r}: dtype {arr.dtype.name} is not supported on the wire")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return pb.Tensor(name=name, shape=list(arr.shape), dtype=arr.dtype.name, data=arr.tobytes())


def tensor_from_pb(t: pb.Tensor) -> np.ndarray:
    if t.dtype not in _ALLOWED_DTYPES:
        raise WireError(f"tensor {t.name!r}: unknown dtype {t.dtype!r}")
    dtype = np.dtype(t.dtype).newbyteorder("<")
    shape = tuple(int(s) for s in t.shape)
    if any(s < 0 for s in shape):
        raise WireError(f"tensor {t.name!r}: negative dimension in shape {shape}")
    expected = math.prod(shape) * dtype.itemsize  # python ints: a hostile shape cannot overflow
    if expected != len(t.data):
        raise WireError(f"tensor {t.name!r}: shape {shape} {t.dtype} needs {expected} bytes, got {len(t.data)}")
    # frombuffer gives a read-only view of the message's bytes; copy so callers own the array.
    try:
        arr = np.frombuffer(t.data, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. an empty tensor whose other dimensions exceed numpy's limits
        raise WireError(f"tensor {t.name!r}: shape {shape} is not representable") from None
    return arr.astype(dtype.newbyteorder("="), copy=True)


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Serialize named arrays (order kept) into TensorSet bytes."""
    ts = pb.TensorSet(tensors=[tensor_to_pb(k, v) for k, v in tensors.items()])
    return ts.SerializeToString()


def decode_tensors(payload: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_tensors`. Raises WireError on anything malformed."""
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
        out[t.name] = tensor_from_pb(t)
    return out


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_chunks(header: pb.Chunk, payload: bytes, chunk_size: int = CHUNK_SIZE) -> Iterator[pb.Chunk]:
    """Yield ``header``, the payload in ``chunk_size`` pieces, then a sha256 trailer."""
    yield header
    view = memoryview(payload)
    digest = hashlib.sha256()
    for start in range(0, len(view), chunk_size):
        piece = view[start : start + chunk_size]
        digest.update(piece)
        yield pb.Chunk(data=bytes(piece))
    yield pb.Chunk(trailer=pb.Trailer(sha256=digest.hexdigest()))


def assemble_chunks(chunks: Iterable[pb.Chunk], header_field: str) -> tuple[object, bytes]:
    """Read a chunk stream back into (header, payload), checking order, size and sha256.

    ``header_field`` is ``"model_header"`` or ``"update_header"``.
    """
    it = iter(chunks)
    try:
        first = next(it)
    except StopIteration:
        raise WireError("empty stream: no header chunk") from None
    if first.WhichOneof("part") != header_field:
        raise WireError(f"stream must start with {header_field}, got {first.WhichOneof('part')}")
    header = getattr(first, header_field)
    total = int(header.total_bytes)
    if total > MAX_PAYLOAD_BYTES:
        raise WireError(f"header announces {total} bytes, above the {MAX_PAYLOAD_BYTES}-byte limit")
    buf = bytearray()
    digest = hashlib.sha256()
    trailer = None
    for chunk in it:
        kind = chunk.WhichOneof("part")
        if trailer is not None:
            raise WireError("data after the trailer")
        if kind == "data":
            if len(buf) + len(chunk.data) > total:
                raise WireError(f"stream carries more than the {total} bytes its header announced")
            buf += chunk.data
            digest.update(chunk.data)
        elif kind == "trailer":
            trailer = chunk.trailer
        else:
            raise WireError(f"unexpected {kind} chunk inside a stream")
    if trailer is None:
        raise WireError("stream ended without a sha256 trailer (truncated)")
    if len(buf) != total:
        raise WireError(f"stream carried {len(buf)} bytes, header announced {total}")
    if digest.hexdigest() != trailer.sha256:
        raise ChecksumError(f"sha256 mismatch: computed {digest.hexdigest()[:12]}…, trailer says {trailer.sha256[:12]}…")
    return header, bytes(buf)
