"""Tensor codec and 1 MiB chunking (protos/codec.py), including a real gRPC round trip of a model
larger than gRPC's default 4 MiB message limit over loopback."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest

from protos import fogfl_pb2 as pb
from protos import fogfl_pb2_grpc as pb_grpc
from protos.codec import (
    ALIGN,
    CHUNK_SIZE,
    _scan_tensor_set,
    assemble_chunks,
    decode_tensors,
    encode_tensors,
    iter_chunks,
    payload_digest,
    tensor_from_pb,
    tensor_to_pb,
)
from protos.errors import ChecksumError, WireError

GRPC_DEFAULT_LIMIT = 4 * 1024 * 1024


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"error message must be one non-empty line: {msg!r}"
    return msg


def _mixed_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "z.weight": rng.normal(size=(4, 3)).astype(np.float32),  # non-alphabetical order on purpose
        "a.bias": rng.normal(size=(7,)).astype(np.float64),
        "half": rng.normal(size=(2, 2, 2)).astype(np.float16),
        "scalar": np.array(3.5, dtype=np.float32),  # 0-d
        "empty": np.zeros((0, 5), dtype=np.float32),  # empty
        "empty1d": np.zeros((0,), dtype=np.int64),
        "labels": rng.integers(-(2**40), 2**40, size=(5,), dtype=np.int64),
        "i32": rng.integers(-1000, 1000, size=(3, 1), dtype=np.int32),
        "i8": np.array([-128, 0, 127], dtype=np.int8),
        "pixels": rng.integers(0, 256, size=(2, 1, 4, 4), dtype=np.uint8),
        "mask": np.array([[True, False], [False, True]]),
        "fortran": np.asfortranarray(rng.normal(size=(3, 4)).astype(np.float32)),
        "bigendian": np.arange(6, dtype=">f4").reshape(2, 3),
        "strided": np.arange(20, dtype=np.float32)[::3],
    }


def _header(total: int) -> pb.Chunk:
    return pb.Chunk(model_header=pb.ModelHeader(version=3, round=2, arch_json='{"arch": "mlp"}',
                                                total_bytes=total))


# --------------------------------------------------------------------------- tensors


def test_roundtrip_keeps_values_dtypes_shapes_and_order():
    src = _mixed_tensors()
    out = decode_tensors(encode_tensors(src))
    assert list(out) == list(src)
    for name, a in src.items():
        b = out[name]
        assert b.shape == a.shape, name
        assert b.dtype == a.dtype.newbyteorder("="), name
        np.testing.assert_array_equal(b, a, err_msg=name)
        assert b.flags.writeable and b.flags.c_contiguous, name  # callers own the array


def test_each_tensors_data_starts_aligned_and_any_protobuf_parser_reads_the_same():
    rng = np.random.default_rng(2)
    src = dict(_mixed_tensors())
    for n in (1, 2, 3, 60, 61, 62, 63, 64, 65, 127, 128, 129, 200):  # name lengths move the header around
        src["n" * n] = rng.normal(size=int(rng.integers(0, 300))).astype(np.float32)
    payload = encode_tensors(src)
    spans = _scan_tensor_set(payload)
    assert spans is not None and [s[0] for s in spans] == list(src)
    assert all(offset % ALIGN == 0 for _, _, _, offset, _ in spans)
    assert len(payload) - sum(s[4] for s in spans) <= sum(len(k) + 30 + ALIGN for k in src)  # the overhead
    parsed = pb.TensorSet()
    parsed.ParseFromString(payload)  # protobuf's own parser: the pad field is read and ignored
    for t, (name, a) in zip(parsed.tensors, src.items(), strict=True):
        assert t.name == name and list(t.shape) == list(a.shape)
        np.testing.assert_array_equal(tensor_from_pb(t), a, err_msg=name)
    # in a 64-byte aligned buffer every tensor is an aligned view: nothing to copy
    buf = np.empty(len(payload) + ALIGN, np.uint8)
    start = (-buf.ctypes.data) % ALIGN
    buf[start:start + len(payload)] = np.frombuffer(payload, np.uint8)
    views = decode_tensors(memoryview(buf[start:start + len(payload)]), copy=False)
    for name, a in src.items():
        v = views[name]
        np.testing.assert_array_equal(v, a, err_msg=name)
        if v.size and v.dtype == a.dtype:
            assert v.flags.aligned and np.shares_memory(v, buf), name


def test_payloads_without_pad_as_fogfl_02_wrote_them_still_decode_in_place():
    src = _mixed_tensors()
    old = pb.TensorSet(tensors=[tensor_to_pb(k, v) for k, v in src.items()]).SerializeToString()
    assert _scan_tensor_set(old) is not None
    for name, a in decode_tensors(old).items():
        np.testing.assert_array_equal(a, src[name], err_msg=name)


def test_a_pad_field_elsewhere_is_read_by_the_full_parser_with_the_same_values():
    data = np.arange(4, dtype=np.float32).tobytes()
    head = b"\x0a\x01w" + b"\x12\x01\x04" + b"\x1a\x07float32"
    for body in (head + b"\x22\x10" + data + b"\x2a\x02\0\0",  # pad after the data
                 head + b"\x2a\x01\0" + b"\x2a\x01\0" + b"\x22\x10" + data,  # pad twice
                 b"\x2a\x01\0" + head + b"\x22\x10" + data):  # pad first
        payload = b"\x0a" + bytes([len(body)]) + body
        assert _scan_tensor_set(payload) is None  # not the canonical layout
        np.testing.assert_array_equal(decode_tensors(payload)["w"], [0, 1, 2, 3])


def test_decoded_array_does_not_alias_the_payload():
    payload = encode_tensors({"w": np.ones(4, dtype=np.float32)})
    out = decode_tensors(payload)
    out["w"][:] = 7
    assert decode_tensors(payload)["w"].tolist() == [1, 1, 1, 1]


def test_empty_tensor_set_roundtrips():
    assert encode_tensors({}) == b""
    assert decode_tensors(b"") == {}


def test_unsupported_dtype_is_refused_on_encode():
    with pytest.raises(WireError) as e:
        encode_tensors({"c": np.zeros(2, dtype=np.complex64)})
    assert "complex64" in _one_line(e)


@pytest.mark.parametrize(
    "tensor, needle",
    [
        (pb.Tensor(name="w", shape=[2, 2], dtype="float32", data=b"\0" * 15), "needs 16 bytes, got 15"),
        (pb.Tensor(name="w", shape=[2], dtype="complex128", data=b"\0" * 32), "unknown dtype"),
        (pb.Tensor(name="w", shape=[-1, 4], dtype="float32", data=b""), "negative dimension"),
        # the product overflows int64: must still be a WireError, not a numpy ValueError
        (pb.Tensor(name="w", shape=[2**32, 2**32], dtype="uint8", data=b""), "needs"),
        (pb.Tensor(name="w", shape=[2**62, 4, 0], dtype="float32", data=b""), "w"),
    ],
)
def test_malformed_tensor_raises_wire_error(tensor, needle):
    with pytest.raises(WireError) as e:
        tensor_from_pb(tensor)
    assert needle in _one_line(e)
    with pytest.raises(WireError):
        decode_tensors(pb.TensorSet(tensors=[tensor]).SerializeToString())


def test_duplicate_tensor_name_is_refused():
    t = tensor_to_pb("w", np.zeros(2, dtype=np.float32))
    with pytest.raises(WireError) as e:
        decode_tensors(pb.TensorSet(tensors=[t, t]).SerializeToString())
    assert "'w'" in _one_line(e)


@pytest.mark.parametrize(
    "garbage",
    [
        b"hello, this is not a tensor set",
        b"\xff" * 64,
        bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        b"\x10\x05",  # a well-formed protobuf varint in a field TensorSet does not have
        b"\x08\x01",  # field 1 with the wrong wire type
    ],
)
def test_garbage_payload_raises_wire_error(garbage):
    with pytest.raises(WireError) as e:
        decode_tensors(garbage)
    _one_line(e)


# --------------------------------------------------------------------------- chunking


def test_chunk_assemble_roundtrip_of_a_model_over_4mib():
    model = {
        "fc1.weight": np.random.default_rng(0).normal(size=(6_000_000,)).astype(np.float32),
        "fc1.bias": np.arange(10, dtype=np.float32),
    }
    payload = encode_tensors(model)
    assert len(payload) > GRPC_DEFAULT_LIMIT
    chunks = list(iter_chunks(_header(len(payload)), payload))

    assert chunks[0].WhichOneof("part") == "model_header"
    assert chunks[-1].WhichOneof("part") == "trailer"
    data = chunks[1:-1]
    assert all(c.WhichOneof("part") == "data" for c in data)
    assert len(data) >= 6 and len(data) == -(-len(payload) // CHUNK_SIZE)
    assert CHUNK_SIZE == 1 << 20
    assert all(len(c.data) == CHUNK_SIZE for c in data[:-1])
    assert 0 < len(data[-1].data) <= CHUNK_SIZE
    # every message on the wire stays far below gRPC's default limit
    assert max(c.ByteSize() for c in chunks) < CHUNK_SIZE + 64 < GRPC_DEFAULT_LIMIT
    assert chunks[-1].trailer.xxh3_128 == payload_digest(payload)

    header, got = assemble_chunks(chunks, "model_header")
    assert header.version == 3 and header.round == 2 and header.total_bytes == len(payload)
    assert got == payload
    back = decode_tensors(got)
    assert list(back) == list(model)
    np.testing.assert_array_equal(back["fc1.weight"], model["fc1.weight"])


def test_chunking_of_empty_and_exact_multiple_payloads():
    for size in (0, 1, CHUNK_SIZE, 2 * CHUNK_SIZE, 2 * CHUNK_SIZE + 1):
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        chunks = list(iter_chunks(_header(size), payload))
        assert len(chunks) == 2 + -(-size // CHUNK_SIZE), size
        assert assemble_chunks(chunks, "model_header")[1] == payload


def test_update_stream_roundtrip_with_custom_chunk_size():
    payload = encode_tensors({"d": np.arange(1000, dtype=np.float64)})
    hdr = pb.Chunk(update_header=pb.UpdateHeader(fog_id="fog-1", round=4, num_samples=12,
                                                 update_kind="delta", total_bytes=len(payload)))
    chunks = list(iter_chunks(hdr, payload, chunk_size=1000))
    assert len(chunks) == 2 + -(-len(payload) // 1000)
    header, got = assemble_chunks(chunks, "update_header")
    assert header.fog_id == "fog-1" and header.num_samples == 12 and got == payload


def _stream(payload: bytes = b"abcdefgh" * 1000) -> list[pb.Chunk]:
    return list(iter_chunks(_header(len(payload)), payload, chunk_size=1024))


def test_digest_mismatch_raises_checksum_error():
    chunks = _stream()
    chunks[3] = pb.Chunk(data=b"X" + chunks[3].data[1:])  # same size, one byte changed
    with pytest.raises(ChecksumError) as e:
        assemble_chunks(chunks, "model_header")
    assert "xxh3-128" in _one_line(e)

    chunks = _stream()
    chunks[-1] = pb.Chunk(trailer=pb.Trailer(xxh3_128="0" * 64))
    with pytest.raises(ChecksumError):
        assemble_chunks(chunks, "model_header")


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c: c[:-1], "trailer"),  # truncated: no trailer
        (lambda c: c[:3], "trailer"),  # truncated mid-stream
        (lambda c: c[:-2] + c[-1:], "announced"),  # a data chunk lost, trailer present
        (lambda c: c[:-1] + [pb.Chunk(data=b"more")] + c[-1:], "more than"),  # beyond the size
        (lambda c: c[1:], "must start with model_header"),  # wrong first chunk (data)
        (lambda c: [pb.Chunk(update_header=pb.UpdateHeader())] + c[1:], "must start with model_header"),
        (lambda c: [], "empty stream"),
        (lambda c: c + [pb.Chunk(data=b"x")], "after the trailer"),
        (lambda c: c[:2] + [c[0]] + c[2:], "unexpected model_header"),  # second header inside
        (lambda c: [_header(3 << 30)] + c[1:], "limit"),  # absurd announced size
    ],
)
def test_malformed_stream_raises_one_line_wire_error(mutate, needle):
    with pytest.raises(WireError) as e:
        assemble_chunks(mutate(_stream()), "model_header")
    assert not isinstance(e.value, ChecksumError)
    assert needle in _one_line(e)


def test_garbage_payload_through_a_valid_stream_fails_on_decode():
    garbage = b"\xff\xfe not a tensor set " * 100
    _, payload = assemble_chunks(iter_chunks(_header(len(garbage)), garbage), "model_header")
    with pytest.raises(WireError):
        decode_tensors(payload)


# --------------------------------------------------------------------------- gRPC


class _Aggregator(pb_grpc.AggregatorServicer):
    """Serves one model in 1 MiB chunks, or (for fog_id 'unchunked') as one huge message, and
    accepts an uploaded update stream."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received: bytes | None = None

    def DownloadModel(self, request, context):  # noqa: N802 - gRPC method name
        header = _header(len(self.payload))
        if request.fog_id == "unchunked":
            yield header
            yield pb.Chunk(data=self.payload)
            yield pb.Chunk(trailer=pb.Trailer(xxh3_128=payload_digest(self.payload)))
            return
        yield from iter_chunks(header, self.payload)

    def UploadUpdate(self, request_iterator, context):  # noqa: N802 - gRPC method name
        try:
            header, payload = assemble_chunks(request_iterator, "update_header")
        except WireError as exc:
            return pb.UploadAck(accepted=False, reason=str(exc))
        self.received = payload
        return pb.UploadAck(accepted=True, round=header.round)


@pytest.fixture()
def grpc_model():
    rng = np.random.default_rng(7)
    model = {"w": rng.normal(size=(1_500_000,)).astype(np.float32), "b": np.ones(3, np.float32)}
    payload = encode_tensors(model)
    assert len(payload) > GRPC_DEFAULT_LIMIT
    servicer = _Aggregator(payload)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))  # default message limits
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")  # default message limits
    try:
        yield model, payload, servicer, pb_grpc.AggregatorStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def test_grpc_download_and_upload_over_4mib_at_default_limits(grpc_model):
    model, payload, servicer, stub = grpc_model

    chunks = list(stub.DownloadModel(pb.ModelRequest(fog_id="fog-0", round=1), timeout=30))
    assert len(chunks) - 2 >= 6
    header, got = assemble_chunks(chunks, "model_header")
    assert got == payload and header.total_bytes == len(payload)
    np.testing.assert_array_equal(decode_tensors(got)["w"], model["w"])

    up = pb.Chunk(update_header=pb.UpdateHeader(fog_id="fog-0", round=1, update_kind="delta",
                                                total_bytes=len(payload)))
    ack = stub.UploadUpdate(iter_chunks(up, payload), timeout=30)
    assert ack.accepted, ack.reason
    assert ack.round == 1 and servicer.received == payload


def test_grpc_unchunked_payload_hits_the_default_limit(grpc_model):
    """The control: the same payload as a single message is refused, in both directions, so the
    round trip above works because of the chunking."""
    _, payload, servicer, stub = grpc_model
    with pytest.raises(grpc.RpcError) as e:
        list(stub.DownloadModel(pb.ModelRequest(fog_id="unchunked", round=1), timeout=30))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    up = pb.Chunk(update_header=pb.UpdateHeader(fog_id="fog-0", round=1, total_bytes=len(payload)))
    one_piece = [up, pb.Chunk(data=payload), pb.Chunk(trailer=pb.Trailer(xxh3_128=payload_digest(payload)))]
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadUpdate(iter(one_piece), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.received is None


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "2-d"])
def test_all_finite_finds_nan_and_both_infinities_and_accepts_huge_finite_values(dtype, layout):
    from protos.codec import all_finite

    def shaped(a):
        if layout == "strided":
            return a[::3]
        if layout == "2-d":
            return a.reshape(50, -1)
        return a

    base = np.linspace(-1, 1, 3000).astype(dtype)
    assert all_finite(shaped(base))
    huge = np.full(3000, np.finfo(dtype).max, dtype=dtype)  # x . x and the sum both overflow
    huge[::2] *= -1
    assert all_finite(shaped(huge))
    for poison in (np.nan, np.inf, -np.inf):
        bad = base.copy()
        bad[1500] = poison  # index 1500 survives [::3] and every reshape
        assert not all_finite(shaped(bad)), (dtype, layout, poison)
