"""The capture format (protos/capture.py): round trip, and every broken file is a one-line
CaptureError."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from protos import fogfl_pb2 as pb
from protos.capture import (
    FORMAT_VERSION,
    MAGIC,
    CaptureError,
    build_capture,
    read_capture,
    read_truth,
    truth_path,
    write_capture,
    write_truth,
)
from protos.codec import encode_tensors, sha256_hex
from protos.errors import WireError

HEAD = struct.Struct("<8sIQ")  # the documented layout: magic, u32 version, u64 body length


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"error message must be one non-empty line: {msg!r}"
    return msg


def _model() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    served = {"fc.weight": rng.normal(size=(10, 64)).astype(np.float32),
              "fc.bias": rng.normal(size=(10,)).astype(np.float32)}
    update = {k: (0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in served.items()}
    return served, update


def _message(note: str = "") -> pb.Capture:
    served, update = _model()
    header = pb.UpdateHeader(
        fog_id="fog-1", round=3, base_version=2, num_samples=8, update_kind="gradient",
        hparams=pb.LocalHParams(lr=0.1, epochs=1, steps=1, batch_size=8, optimizer="sgd"),
        total_bytes=len(encode_tensors(update)),
    )
    return build_capture(
        source="curious-cloud", arch_json=json.dumps({"arch": "mlp", "hidden": 64}), model_version=2,
        served_payload=encode_tensors(served), header=header, update_payload=encode_tensors(update),
        captured_at=1700000000.5, note=note,
    )


@pytest.fixture()
def capture_file(tmp_path):
    return write_capture(tmp_path / "caps", _message())


def test_write_read_roundtrip(tmp_path):
    msg = _message(note="mkor")
    path = write_capture(tmp_path / "caps", msg)
    assert path.name == "r0003-fog-1.fcap"
    assert sorted(p.name for p in path.parent.iterdir()) == ["r0003-fog-1.fcap"]  # no tmp left
    raw = path.read_bytes()
    magic, version, length = HEAD.unpack_from(raw)
    assert (magic, version) == (MAGIC, FORMAT_VERSION)
    assert len(raw) == HEAD.size + length + 32

    cap = read_capture(path)
    assert cap.message == msg
    assert cap.kind == "gradient" and cap.num_samples == 8 and cap.round == 3 and cap.fog_id == "fog-1"
    assert cap.hparams.lr == pytest.approx(0.1) and cap.hparams.batch_size == 8
    assert cap.header.base_version == 2
    assert cap.arch == {"arch": "mlp", "hidden": 64}
    assert cap.message.note == "mkor" and cap.message.source == "curious-cloud"
    assert cap.message.served_sha256 == sha256_hex(msg.served_payload)
    assert cap.message.update_sha256 == sha256_hex(msg.update_payload)
    served, update = _model()
    for got, want in ((cap.served, served), (cap.update, update)):
        assert list(got) == list(want)  # model order kept
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert read_capture(str(path)).message == msg  # str paths work too


def test_rewrite_replaces_atomically(tmp_path):
    a = _message()
    write_capture(tmp_path, a)
    b = _message(note="second")
    path = write_capture(tmp_path, b)
    assert read_capture(path).message.note == "second"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("where", ["empty", "in-magic", "head-only", "mid-body", "no-digest", "half-digest",
                                   "one-short"])
def test_truncated_file_raises(capture_file, where):
    raw = capture_file.read_bytes()
    length = HEAD.unpack_from(raw)[2]
    cut = {"empty": 0, "in-magic": 5, "head-only": HEAD.size, "mid-body": HEAD.size + length // 2,
           "no-digest": HEAD.size + length, "half-digest": HEAD.size + length + 16,
           "one-short": len(raw) - 1}[where]
    capture_file.write_bytes(raw[:cut])
    with pytest.raises(CaptureError) as e:
        read_capture(capture_file)
    assert "truncated" in _one_line(e)
    assert str(capture_file) in str(e.value)


@pytest.mark.parametrize("offset", [0, 7, 8, 12, 19, 20, 100, -40, -1])
def test_flipped_byte_raises(capture_file, offset):
    raw = bytearray(capture_file.read_bytes())
    raw[offset] ^= 0x5A
    capture_file.write_bytes(bytes(raw))
    with pytest.raises(CaptureError) as e:
        read_capture(capture_file)
    msg = _one_line(e)
    if offset in (0, 7):
        assert "magic" in msg
    elif offset in (8,):
        assert "version" in msg
    elif offset >= 20 or offset < 0:
        assert "corrupt" in msg


def test_wrong_magic(capture_file):
    raw = capture_file.read_bytes()
    capture_file.write_bytes(b"PK\x03\x04XXXX" + raw[8:])
    with pytest.raises(CaptureError) as e:
        read_capture(capture_file)
    assert "not a fogfl capture" in _one_line(e)


def test_future_version(capture_file):
    raw = capture_file.read_bytes()
    _, _, length = HEAD.unpack_from(raw)
    capture_file.write_bytes(HEAD.pack(MAGIC, FORMAT_VERSION + 1, length) + raw[HEAD.size:])
    with pytest.raises(CaptureError) as e:
        read_capture(capture_file)
    msg = _one_line(e)
    assert f"version {FORMAT_VERSION + 1}" in msg and f"reads {FORMAT_VERSION}" in msg


def test_empty_file_directory_and_missing_file(tmp_path):
    empty = tmp_path / "empty.fcap"
    empty.write_bytes(b"")
    for path, needle in ((empty, "truncated"), (tmp_path, "directory"), (tmp_path / "nope.fcap", "no such")):
        with pytest.raises(CaptureError) as e:
            read_capture(path)
        assert needle in _one_line(e)
        assert isinstance(e.value, WireError)


def _with_body(path, body: bytes) -> None:
    path.write_bytes(HEAD.pack(MAGIC, FORMAT_VERSION, len(body)) + body + hashlib.sha256(body).digest())


def test_intact_envelope_around_a_bad_body(tmp_path):
    path = tmp_path / "x.fcap"
    _with_body(path, b"\xff" * 10)  # checksum fine, but not a Capture message
    with pytest.raises(CaptureError) as e:
        read_capture(path)
    assert "not a Capture" in _one_line(e)

    bad_payload = _message()
    bad_payload.update_payload = b"\xff\xfe garbage"
    _with_body(path, bad_payload.SerializeToString())
    with pytest.raises(CaptureError) as e:
        read_capture(path)
    assert "TensorSet" in _one_line(e)

    bad_arch = _message()
    bad_arch.arch_json = "{not json"
    _with_body(path, bad_arch.SerializeToString())
    with pytest.raises(CaptureError) as e:
        read_capture(path)
    _one_line(e)


# --------------------------------------------------------------------------- ground truth


def test_truth_roundtrip(tmp_path, capture_file):
    x = np.random.default_rng(0).random((4, 1, 8, 8))  # float64 in, float32 out
    y = np.array([3, 1, 4, 1], dtype=np.int32)
    path = write_truth(capture_file.parent, 3, "fog-1", x, y)
    assert path == truth_path(capture_file)
    assert path.name == "r0003-fog-1.truth.npz"
    gx, gy = read_truth(path)
    assert gx.dtype == np.float32 and gy.dtype == np.int64
    np.testing.assert_allclose(gx, x, rtol=1e-6)
    np.testing.assert_array_equal(gy, y)


def test_broken_truth_files_raise(tmp_path):
    good = write_truth(tmp_path, 0, "fog-0", np.zeros((2, 1, 4, 4)), np.zeros(2))
    raw = good.read_bytes()
    cases = {}
    cases["missing"] = tmp_path / "missing.truth.npz"
    cases["garbage"] = tmp_path / "garbage.truth.npz"
    cases["garbage"].write_bytes(b"definitely not an npz")
    cases["truncated"] = tmp_path / "trunc.truth.npz"
    cases["truncated"].write_bytes(raw[: len(raw) // 2])
    cases["flipped"] = tmp_path / "flip.truth.npz"
    flipped = bytearray(raw)
    flipped[60] ^= 0xFF
    cases["flipped"].write_bytes(bytes(flipped))
    cases["no-y"] = tmp_path / "noy.truth.npz"
    np.savez(cases["no-y"], x=np.zeros(2))
    cases["plain-npy"] = tmp_path / "plain.npy"
    np.save(cases["plain-npy"], np.zeros(3))
    cases["directory"] = tmp_path / "adir"
    cases["directory"].mkdir()
    for name, path in cases.items():
        with pytest.raises(CaptureError) as e:
            read_truth(path)
        assert str(path) in _one_line(e), name
