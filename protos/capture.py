"""The capture format: one self-describing, versioned file per recorded update.

Layout (all integers little-endian)::

    b"FOGFLCAP"            8 bytes  magic
    u32 format_version     4 bytes  (= FORMAT_VERSION)
    u64 body_length        8 bytes
    body                   protobuf ``fogfl.Capture``
    sha256(body)           32 bytes

The body holds the architecture spec (JSON), the parameters served to the fog (TensorSet bytes),
the update header exactly as the fog sent it (kind, sample count, local lr/steps/batch/epochs),
and the update payload exactly as uploaded. Ground truth is never inside a capture; the testbed
may write it beside the capture as ``<stem>.truth.npz`` (arrays ``x`` and ``y``) for scoring.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protos import fogfl_pb2 as pb
from protos.codec import decode_tensors, sha256_hex
from protos.errors import WireError

MAGIC = b"FOGFLCAP"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sIQ")


class CaptureError(WireError):
    """A capture file is missing, truncated, corrupt, or of an unknown version."""


@dataclass
class Capture:
    """A decoded capture. ``served`` and ``update`` are name -> array in model order."""

    message: pb.Capture
    served: dict[str, np.ndarray]
    update: dict[str, np.ndarray]
    arch: dict

    @property
    def header(self) -> pb.UpdateHeader:
        return self.message.header

    @property
    def kind(self) -> str:
        return self.message.header.update_kind

    @property
    def num_samples(self) -> int:
        return int(self.message.header.num_samples)

    @property
    def hparams(self) -> pb.LocalHParams:
        return self.message.header.hparams

    @property
    def round(self) -> int:
        return int(self.message.round)

    @property
    def fog_id(self) -> str:
        return self.message.fog_id


def build_capture(
    *,
    source: str,
    arch_json: str,
    model_version: int,
    served_payload: bytes | memoryview,
    header: pb.UpdateHeader,
    update_payload: bytes | memoryview,
    captured_at: float,
    note: str = "",
) -> pb.Capture:
    # a received payload may be a memoryview of the receive buffer; protobuf fields take bytes
    served_payload, update_payload = bytes(served_payload), bytes(update_payload)
    return pb.Capture(
        format_version=FORMAT_VERSION,
        source=source,
        arch_json=arch_json,
        round=header.round,
        fog_id=header.fog_id,
        model_version=model_version,
        served_payload=served_payload,
        header=header,
        update_payload=update_payload,
        served_sha256=sha256_hex(served_payload),
        update_sha256=sha256_hex(update_payload),
        captured_at=captured_at,
        note=note,
    )


def capture_stem(round_: int, fog_id: str) -> str:
    return f"r{round_:04d}-{fog_id}"


def write_capture(directory: Path | str, msg: pb.Capture) -> Path:
    """Write atomically (tmp + rename) as ``<dir>/r<round>-<fog>.fcap``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    body = msg.SerializeToString()
    path = directory / f"{capture_stem(msg.round, msg.fog_id)}.fcap"
    tmp = path.with_suffix(".fcap.tmp")
    with open(tmp, "wb") as f:
        f.write(_HEAD.pack(MAGIC, FORMAT_VERSION, len(body)))
        f.write(body)
        f.write(hashlib.sha256(body).digest())
    tmp.replace(path)
    return path


def read_capture(path: Path | str) -> Capture:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaptureError(f"{path}: no such capture file") from None
    except IsADirectoryError:
        raise CaptureError(f"{path}: is a directory, expected a .fcap file") from None
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read capture ({exc.strerror or exc.__class__.__name__})") from None
    if len(data) < _HEAD.size:
        raise CaptureError(f"{path}: truncated ({len(data)} bytes, shorter than the header)")
    magic, version, length = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CaptureError(f"{path}: not a fogfl capture (bad magic)")
    if version != FORMAT_VERSION:
        raise CaptureError(f"{path}: capture format version {version}, this fogfl reads {FORMAT_VERSION}")
    body = data[_HEAD.size : _HEAD.size + length]
    digest = data[_HEAD.size + length : _HEAD.size + length + 32]
    if len(body) != length or len(digest) != 32:
        raise CaptureError(f"{path}: truncated (body {len(body)} of {length} bytes)")
    if hashlib.sha256(body).digest() != digest:
        raise CaptureError(f"{path}: corrupt (sha256 of the body does not match)")
    msg = pb.Capture()
    try:
        msg.ParseFromString(body)
    except Exception:
        raise CaptureError(f"{path}: corrupt (body is not a Capture message)") from None
    try:
        arch = json.loads(msg.arch_json)
        served = decode_tensors(msg.served_payload)
        update = decode_tensors(msg.update_payload)
    except (ValueError, WireError) as exc:
        raise CaptureError(f"{path}: {exc}") from None
    return Capture(message=msg, served=served, update=update, arch=arch)


def truth_path(capture_path: Path | str) -> Path:
    p = Path(capture_path)
    return p.with_name(p.name.removesuffix(".fcap") + ".truth.npz")


def write_truth(directory: Path | str, round_: int, fog_id: str, x: np.ndarray, y: np.ndarray) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{capture_stem(round_, fog_id)}.truth.npz"
    np.savez_compressed(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return path


def read_truth(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path) as z:
            return z["x"], z["y"]
    except FileNotFoundError:
        raise CaptureError(f"{path}: no such ground-truth file") from None
    except (KeyError, ValueError, OSError, EOFError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
        # TypeError: a plain .npy (np.load returns an array, not an archive)
        raise CaptureError(f"{path}: not a ground-truth file ({exc.__class__.__name__})") from None
