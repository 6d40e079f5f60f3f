"""Model download / update upload over the real gRPC service with the pass-through (de)serializers
(protos.codec chunk_frames / parse_chunk, cloud.service, fog.service.CloudClient): the bytes on the
wire are the generated stubs' ``Chunk`` messages, so either side may be the generated one; the
receiver still checks size and the XXH3-128 digest; the zero-copy decode gives the same tensors as the copying
one."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest

from cloud.node import CloudNode
from cloud.service import AggregatorServicer, start_grpc_server
from fog.service import CloudClient
from kernel.config import build_config
from protos import fogfl_pb2 as pb
from protos import fogfl_pb2_grpc as pb_grpc
from protos.codec import (
    CHUNK_SIZE,
    ChunkedPayload,
    assemble_chunks,
    chunk_frames,
    decode_tensors,
    encode_data_chunk,
    encode_tensors,
    iter_chunks,
    parse_chunk,
    payload_digest,
    receive_stream,
)
from protos.errors import ChecksumError, WireError

GRPC_DEFAULT_LIMIT = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def node() -> CloudNode:
    # mnist 784 -> 1600 -> 10: 1.27 M parameters, a 5.1 MB payload (> gRPC's 4 MiB default limit)
    cfg = build_config([], [("data.dataset", "mnist5k"), ("model.hidden", 1600), ("cloud.warm_start.per_class", 0),
                            ("topology.fogs", 1), ("rounds", 100)], use_env=False)
    n = CloudNode(cfg)
    assert len(n.serve_model("fog-0")[1]) > GRPC_DEFAULT_LIMIT
    return n


@pytest.fixture(scope="module")
def fast_server(node):
    """The cloud's own server: AggregatorServicer with the pass-through registration."""
    server, port, _ = start_grpc_server(AggregatorServicer(node), "127.0.0.1", 0)
    yield port
    server.stop(0)


@pytest.fixture(scope="module")
def generated_server(node):
    """The same servicer registered by the generated add_AggregatorServicer_to_server."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AggregatorServicer_to_server(AggregatorServicer(node), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def _update_header(node: CloudNode, payload: bytes) -> pb.UpdateHeader:
    return pb.UpdateHeader(fog_id="fog-0", round=node.round_no, base_version=node.version, num_samples=7,
                           update_kind="delta", total_bytes=len(payload), labels_total=7)


def _round_trip(node: CloudNode, download, upload) -> None:
    """One round: the model downloaded equals the one served; an uploaded delta of +0.25 lands
    in the new global model (FedAvg of one update = global + delta)."""
    node.start_round()
    header, payload = download()
    served = node.serve_model("fog-0")[1]
    assert isinstance(payload, memoryview) and payload.readonly and payload == served
    assert header.version == node.version and header.total_bytes == len(payload)
    before = decode_tensors(payload)
    delta = {k: np.full_like(v, 0.25) for k, v in before.items()}
    up = encode_tensors(delta)
    ack = upload(_update_header(node, up), up)
    assert ack.accepted, ack.reason
    node.finish_round()
    for k, v in node.params.items():
        np.testing.assert_allclose(v, before[k] + np.float32(0.25), rtol=0, atol=1e-6)


def test_fast_client_round_trip_through_the_cloud_server(node, fast_server):
    client = CloudClient(f"127.0.0.1:{fast_server}")
    try:
        client.wait_ready(10)
        _round_trip(node, lambda: client.download("fog-0", node.round_no), client.upload)
        assert client.bytes_down > GRPC_DEFAULT_LIMIT and client.bytes_up > GRPC_DEFAULT_LIMIT
    finally:
        client.close()


def test_with_malloc_tuned_as_node_processes_do_transfers_still_round_trip(node, fast_server):
    import platform

    from kernel.runtime import tune_malloc

    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")  # glibc accepted both thresholds
    client = CloudClient(f"127.0.0.1:{fast_server}")
    try:
        client.wait_ready(10)
        for _ in range(2):  # the second transfer runs on buffers the first one freed
            _round_trip(node, lambda: client.download("fog-0", node.round_no), client.upload)
    finally:
        client.close()


def test_generated_stub_client_round_trip_through_the_cloud_server(node, fast_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{fast_server}")
    stub = pb_grpc.AggregatorStub(channel)

    def download():
        chunks = list(stub.DownloadModel(pb.ModelRequest(fog_id="fog-0", round=node.round_no), timeout=30))
        assert all(isinstance(c, pb.Chunk) for c in chunks) and len(chunks) >= 2 + 4
        return assemble_chunks(chunks, "model_header")

    def upload(h, payload):
        return stub.UploadUpdate(iter_chunks(pb.Chunk(update_header=h), payload), timeout=30)

    try:
        _round_trip(node, download, upload)
    finally:
        channel.close()


def test_fast_client_round_trip_through_a_generated_registration(node, generated_server):
    client = CloudClient(f"127.0.0.1:{generated_server}")
    try:
        _round_trip(node, lambda: client.download("fog-0", node.round_no), client.upload)
    finally:
        client.close()


def test_corrupted_upload_is_rejected_and_not_aggregated(node, fast_server):
    node.start_round()
    payload = encode_tensors({k: np.ones_like(v) for k, v in node.params.items()})
    frames = list(chunk_frames(pb.Chunk(update_header=_update_header(node, payload)), payload))
    bad = bytearray(frames[3])
    bad[100] ^= 0xFF  # a flipped bit inside a data chunk: still valid protobuf, same size
    frames[3] = bytes(bad)
    channel = grpc.insecure_channel(f"127.0.0.1:{fast_server}")
    raw_upload = channel.stream_unary("/fogfl.Aggregator/UploadUpdate", request_serializer=lambda b: b,
                                      response_deserializer=pb.UploadAck.FromString)
    try:
        ack = raw_upload(iter(frames), timeout=30)
    finally:
        channel.close()
    assert not ack.accepted and "xxh3-128" in ack.reason
    assert node.current is not None and not node.current.received  # nothing reached the node
    node.finish_round()


class _CorruptingServicer(AggregatorServicer):
    def download_frames(self, request, context):
        for i, frame in enumerate(super().download_frames(request, context)):
            yield frame[:-1] + bytes([frame[-1] ^ 1]) if i == 2 else frame


def test_corrupted_download_raises_checksum_error(node):
    server, port, _ = start_grpc_server(_CorruptingServicer(node), "127.0.0.1", 0)
    client = CloudClient(f"127.0.0.1:{port}")
    try:
        with pytest.raises(ChecksumError, match="xxh3-128"):
            client.download("fog-0", node.round_no)
    finally:
        client.close()
        server.stop(0)


# --------------------------------------------------------------------------- frames on the wire


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 2_097_151, 2_097_152, CHUNK_SIZE])
def test_hand_encoded_data_chunk_is_the_generated_serialization(size):
    piece = bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)
    frame = encode_data_chunk(memoryview(piece))
    assert frame == pb.Chunk(data=piece).SerializeToString()
    parsed = pb.Chunk.FromString(frame)
    assert parsed.WhichOneof("part") == "data" and parsed.data == piece
    view = parse_chunk(frame)
    assert isinstance(view, memoryview) and view.readonly and bytes(view) == piece


def test_frames_are_the_serialized_messages_of_iter_chunks():
    payload = np.random.default_rng(3).integers(0, 256, size=2 * CHUNK_SIZE + 12345, dtype=np.uint8).tobytes()
    header = pb.Chunk(update_header=pb.UpdateHeader(fog_id="fog-9", round=3, total_bytes=len(payload)))
    messages = list(iter_chunks(header, payload))
    frames = list(chunk_frames(header, payload))
    assert frames == [m.SerializeToString() for m in messages]
    assert [pb.Chunk.FromString(f) for f in frames] == messages
    # with a known digest the frames are the same
    assert list(chunk_frames(header, payload, digest=payload_digest(payload))) == frames
    # the fast deserializer gives data as views, everything else as messages; the stream assembles
    items = [parse_chunk(f) for f in frames]
    assert [type(i) for i in items] == [pb.Chunk, memoryview, memoryview, memoryview, pb.Chunk]
    got_header, got = assemble_chunks(items, "update_header")
    assert got == payload and isinstance(got, memoryview) and got.readonly and got_header.fog_id == "fog-9"


@pytest.mark.parametrize("raw", [
    encode_data_chunk(b"abc") + pb.Chunk(trailer=pb.Trailer(xxh3_128="x")).SerializeToString(),  # oneof: last wins
    encode_data_chunk(b"abc") + encode_data_chunk(b"de"),  # repeated field: last wins
    b"\x1a\x85\x00abcde",  # over-long varint for the length (still valid protobuf)
    pb.Chunk(trailer=pb.Trailer(xxh3_128="f" * 64)).SerializeToString(),
])
def test_parse_chunk_agrees_with_the_generated_parser(raw):
    expected = pb.Chunk.FromString(raw)
    got = parse_chunk(raw)
    if isinstance(got, memoryview):
        assert expected.WhichOneof("part") == "data" and bytes(got) == expected.data
    else:
        assert got == expected


def test_parse_chunk_rejects_what_the_generated_parser_rejects():
    for raw in (b"\x1a\x05ab", b"\x1a", b"\xff\xff\xff"):
        with pytest.raises(Exception) as generated:
            pb.Chunk.FromString(raw)
        with pytest.raises(type(generated.value)):
            parse_chunk(raw)


def _fast_stream(payload: bytes, chunk_size: int = 1024) -> list:
    header = pb.Chunk(model_header=pb.ModelHeader(version=1, total_bytes=len(payload)))
    return [parse_chunk(f) for f in chunk_frames(header, payload, chunk_size=chunk_size)]


@pytest.mark.parametrize("size", [8000, 3 * CHUNK_SIZE + 5])  # the small path and the in-place buffer
def test_corrupted_view_chunk_raises_checksum_error(size):
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    items = _fast_stream(payload, chunk_size=CHUNK_SIZE if size > CHUNK_SIZE else 1024)
    assert assemble_chunks(items, "model_header")[1] == payload
    flipped = bytearray(items[2])
    flipped[0] ^= 0x40
    items[2] = memoryview(bytes(flipped))
    with pytest.raises(ChecksumError, match="xxh3-128"):
        assemble_chunks(items, "model_header")


def test_a_trailer_from_fogfl_0_1_is_refused_with_a_clear_reason():
    """fogfl 0.1 sent a BLAKE3 digest in the trailer's field 1 (now reserved). A new receiver
    reads no XXH3-128 digest from it and says what it is likely looking at."""
    payload = b"p" * 5000
    items = _fast_stream(payload)
    old_digest = "ab" * 32
    trailer_field_1 = b"\x0a" + bytes([len(old_digest)]) + old_digest.encode()
    items[-1] = parse_chunk(b"\x22" + bytes([len(trailer_field_1)]) + trailer_field_1)  # Chunk.trailer = 4
    assert items[-1].WhichOneof("part") == "trailer" and items[-1].trailer.xxh3_128 == ""
    with pytest.raises(ChecksumError, match=r"xxh3-128 digest mismatch.*fogfl 0\.1"):
        assemble_chunks(items, "model_header")


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c[:-1], "trailer"),
    (lambda c: c[:-2] + c[-1:], "announced"),
    (lambda c: c[:-1] + [memoryview(b"more")] + c[-1:], "more than"),
    (lambda c: c[1:], "must start with model_header"),
    (lambda c: c + [memoryview(b"x")], "after the trailer"),
])
def test_view_chunks_hit_the_same_stream_errors(mutate, needle):
    with pytest.raises(WireError, match=needle) as e:
        assemble_chunks(mutate(_fast_stream(b"abcdefgh" * 1000)), "model_header")
    assert not isinstance(e.value, ChecksumError)


def test_oversized_stream_is_refused_in_the_in_place_buffer_too():
    payload = b"q" * (2 * CHUNK_SIZE)
    items = _fast_stream(payload, chunk_size=CHUNK_SIZE)
    items.insert(-1, memoryview(b"extra"))
    with pytest.raises(WireError, match="more than"):
        assemble_chunks(items, "model_header")


# --------------------------------------------------------------------------- zero-copy decode


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(40, 30)).astype(np.float32),
        "b": rng.normal(size=(7,)).astype(np.float64),
        "half": rng.normal(size=(2, 2, 2)).astype(np.float16),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "labels": rng.integers(-(2**40), 2**40, size=(5,), dtype=np.int64),
        "pixels": rng.integers(0, 256, size=(2, 1, 4, 4), dtype=np.uint8),
        "mask": np.array([[True, False], [False, True]]),
        "bigendian": np.arange(6, dtype=">f4").reshape(2, 3),
        "ünïcode": np.arange(3, dtype=np.int8),
    }


def test_zero_copy_decode_equals_the_copying_decode_and_is_read_only():
    payload = encode_tensors(_tensors())
    copied = decode_tensors(payload)
    views = decode_tensors(payload, copy=False)
    assert list(views) == list(copied)
    raw = np.frombuffer(payload, dtype=np.uint8)
    shared = 0
    for k, v in views.items():
        assert v.dtype == copied[k].dtype and v.shape == copied[k].shape, k
        np.testing.assert_array_equal(v, copied[k])
        assert v.flags.aligned, k  # BLAS and numpy's fast loops need it
        assert not np.shares_memory(copied[k], raw), k  # the default hands out owned arrays
        assert copied[k].flags.writeable, k
        if np.shares_memory(v, raw):
            shared += 1
            assert not v.flags.writeable, k
            with pytest.raises(ValueError):
                v[...] = 0
    assert shared >= 3  # the aligned ones are views (which ones depends on the header lengths)


def test_zero_copy_decode_of_a_non_canonical_encoding_falls_back_to_the_parser():
    # fields of a Tensor in reverse order: valid protobuf, not what protobuf writes
    t = pb.Tensor(name="x", shape=[2], dtype="float32", data=np.array([1, 2], np.float32).tobytes())
    parts = [pb.Tensor(data=t.data), pb.Tensor(dtype=t.dtype), pb.Tensor(shape=t.shape), pb.Tensor(name=t.name)]
    inner = b"".join(p.SerializeToString() for p in parts)
    payload = b"\x0a" + bytes([len(inner)]) + inner
    for copy in (True, False):
        out = decode_tensors(payload, copy=copy)
        np.testing.assert_array_equal(out["x"], [1.0, 2.0])
    # a field given twice: the last name/dtype/data wins, the packed shapes concatenate
    twice = t.SerializeToString() + pb.Tensor(name="y", shape=[1], data=np.array([3, 4], np.float32).tobytes()
                                              ).SerializeToString()
    payload = b"\x0a" + bytes([len(twice)]) + twice
    assert pb.TensorSet.FromString(payload).tensors[0].shape == [2, 1]
    for copy in (True, False):
        out = decode_tensors(payload, copy=copy)
        assert list(out) == ["y"]
        np.testing.assert_array_equal(out["y"], [[3.0], [4.0]])


@pytest.mark.parametrize("payload, needle", [
    (pb.TensorSet(tensors=[pb.Tensor(name="a", shape=[3], dtype="float32", data=b"\0" * 8)]).SerializeToString(),
     "needs 12 bytes"),
    (pb.TensorSet(tensors=[pb.Tensor(name="a", dtype="complex64", data=b"")]).SerializeToString(), "dtype"),
    (pb.TensorSet(tensors=[pb.Tensor(name="a", shape=[-1], dtype="float32")]).SerializeToString(), "negative"),
    (encode_tensors({"a": np.zeros(2, np.float32)}) * 2, "twice"),
    (b"\xff\xfe not a tensor set " * 10, "not a TensorSet"),
    (encode_tensors({"a": np.zeros(2, np.float32)}) + b"\x50\x01", "unknown fields"),
])
def test_zero_copy_decode_raises_the_same_errors(payload, needle):
    for copy in (True, False):
        with pytest.raises(WireError, match=needle):
            decode_tensors(payload, copy=copy)


# --------------------------------------------------------------------------- the receive buffer


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c[:-1], WireError),  # truncated: no trailer
    (lambda c: c[:5] + [memoryview(b"\x00" * CHUNK_SIZE)] + c[6:], ChecksumError),  # same size, bad bytes
    (lambda c: c[:-1] + [memoryview(b"more")] + c[-1:], WireError),  # longer than announced
    (lambda c: c[:4] + [pb.Chunk(model_header=pb.ModelHeader())] + c[4:], WireError),  # a second header
])
def test_big_stream_errors_are_the_streams_errors(mutate, error):
    payload = np.random.default_rng(5).integers(0, 256, size=9 * CHUNK_SIZE + 77, dtype=np.uint8).tobytes()
    header, got = assemble_chunks(_fast_stream(payload, chunk_size=CHUNK_SIZE), "model_header")
    assert got == payload
    with pytest.raises(error):
        assemble_chunks(mutate(_fast_stream(payload, chunk_size=CHUNK_SIZE)), "model_header")

    def exploding():
        items = _fast_stream(payload, chunk_size=CHUNK_SIZE)
        yield from items[:6]
        raise RuntimeError("connection reset")

    with pytest.raises(RuntimeError, match="reset"):
        assemble_chunks(exploding(), "model_header")


def test_unaligned_views_are_not_copied_when_the_reader_allows_it():
    tensors = {"a": np.arange(3, dtype=np.float32), "w": np.arange(1000, dtype=np.float32).reshape(10, 100)}
    payload = encode_tensors(tensors)
    # the payload inside a bigger buffer at an odd offset: every float32 view is unaligned
    holder = np.zeros(len(payload) + 1, dtype=np.uint8)
    holder[1:] = np.frombuffer(payload, dtype=np.uint8)
    view = memoryview(holder)[1:].toreadonly()
    copied = decode_tensors(view, copy=False)
    assert all(v.flags.aligned for v in copied.values())
    assert not all(np.shares_memory(v, holder) for v in copied.values())  # the unaligned ones were copied
    views = decode_tensors(view, copy=False, aligned=False)
    assert any(not v.flags.aligned for v in views.values())
    assert all(np.shares_memory(v, holder) and not v.flags.writeable for v in views.values())
    for k, v in tensors.items():
        np.testing.assert_array_equal(views[k], v)
        assert float(views[k].sum()) == float(v.sum())


# --------------------------------------------------------------------------- NaN/inf while receiving


def _tensor_set(rng, poison: dict[str, float]) -> dict[str, np.ndarray]:
    out = {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "steps": np.arange(5, dtype=np.int64),
        "fc.weight": rng.normal(size=(37, 29)).astype(np.float32),
        "half": rng.normal(size=(11,)).astype(np.float16),
        "fc.bias": rng.normal(size=(29,)).astype(np.float64),
    }
    for name, value in poison.items():
        out[name].reshape(-1)[rng.integers(out[name].size)] = value
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000, CHUNK_SIZE])
@pytest.mark.parametrize("poison", [{}, {"fc.weight": np.nan}, {"conv.weight": -np.inf, "fc.bias": np.inf},
                                    {"half": np.nan}])
@pytest.mark.parametrize("chunked", [False, True])
def test_stream_finds_nonfinite_tensors_whatever_the_chunking(chunk_size, poison, chunked):
    """Headers and values split across chunks at every offset: the verdict found while receiving
    is exactly the set of float tensors holding NaN or infinity, whether the chunks are copied
    into one buffer or kept where they arrived (then every tensor decodes to the same values and
    the layout is known without reading any)."""
    tensors = _tensor_set(np.random.default_rng(len(poison) * 1000 + chunk_size), poison)
    payload = encode_tensors(tensors)
    got = receive_stream(_fast_stream(payload, chunk_size=chunk_size), "model_header", chunked=chunked)
    assert got.nonfinite == frozenset(poison)
    if not chunked:
        assert got.payload == payload
        return
    assert isinstance(got.payload, ChunkedPayload) and len(got.payload) == len(payload)
    assert got.payload.chunks == -(-len(payload) // chunk_size)
    shapes = got.payload.shapes()
    assert list(shapes) == list(tensors)
    assert all(shapes[k].shape == v.shape and shapes[k].dtype == v.dtype for k, v in tensors.items())
    for copy, aligned in ((True, True), (False, False), (False, True)):
        decoded = decode_tensors(got.payload, copy=copy, aligned=aligned)
        assert list(decoded) == list(tensors)
        for k, v in tensors.items():
            np.testing.assert_array_equal(decoded[k], v)
            assert decoded[k].dtype == v.dtype and decoded[k].shape == v.shape
            if copy:  # owned by the caller: writable, and sharing no memory with the kept chunks
                assert decoded[k].flags.writeable, k
    assert got.payload.contiguous() == payload and bytes(got.payload) == payload


def test_a_kept_chunk_decodes_as_a_view_of_it_and_spread_tensors_as_new_arrays():
    """copy=False: a tensor inside one chunk is a read-only view of that chunk (no copy), one
    spread over chunks is gathered once; a payload that is not canonically encoded still decodes
    (through the joined buffer) and has no layout."""
    small = np.arange(6, dtype=np.float32)
    big = np.arange(3000, dtype=np.float32)
    payload = encode_tensors({"small": small, "big": big})
    got = receive_stream(_fast_stream(payload, chunk_size=1024), "model_header", chunked=True).payload
    out = decode_tensors(got, copy=False, aligned=False)
    assert not out["small"].flags.writeable  # a view of the first chunk
    assert out["big"].flags.owndata or out["big"].base.flags.owndata  # gathered: 12 kB over 12 chunks
    np.testing.assert_array_equal(out["big"], big)
    # protobuf allows fields out of order: not the canonical encoding, still the same tensors
    t = pb.Tensor(name="x", shape=[3], dtype="float32", data=np.ones(3, np.float32).tobytes())
    odd = b"".join((b"\x0a", bytes([len(t.SerializeToString())]), _reorder(t)))
    got = receive_stream(_fast_stream(odd, chunk_size=5), "model_header", chunked=True)
    assert got.payload.layout is None and got.payload.shapes() is None and got.nonfinite is None
    np.testing.assert_array_equal(decode_tensors(got.payload)["x"], np.ones(3, np.float32))


def _reorder(t: pb.Tensor) -> bytes:
    """``t`` serialized with its dtype field before its name (valid protobuf, not canonical)."""
    dtype = pb.Tensor(dtype=t.dtype).SerializeToString()
    rest = pb.Tensor(name=t.name, shape=t.shape, data=t.data).SerializeToString()
    return dtype + rest


def test_stream_finiteness_on_a_big_payload_and_huge_finite_values():
    """A 12 MB payload in 1 MiB chunks, with finite values whose float32 sum overflows."""
    rng = np.random.default_rng(9)
    w = rng.normal(size=(3_000_000,)).astype(np.float32)
    w[:8] = np.float32(3e38)  # finite, but they overflow a float32 sum
    payload = encode_tensors({"w": w, "b": np.ones(3, dtype=np.float32)})
    assert len(payload) > 8 << 20
    assert receive_stream(_fast_stream(payload, chunk_size=CHUNK_SIZE), "model_header").nonfinite == frozenset()
    w[2_500_000] = np.nan
    payload = encode_tensors({"w": w, "b": np.ones(3, dtype=np.float32)})
    assert receive_stream(_fast_stream(payload, chunk_size=CHUNK_SIZE), "model_header").nonfinite == {"w"}


def test_stream_gives_no_verdict_on_a_payload_it_cannot_follow():
    odd = pb.TensorSet(tensors=[pb.Tensor(name="x", shape=[2], dtype="float32",
                                          data=np.array([np.nan, 1], np.float32).tobytes())])
    raw = odd.SerializeToString()
    reordered = raw[:2] + raw[2:].replace(b"\x12\x01\x02", b"") + b"\x12\x01\x02"  # shape after data
    assert decode_tensors(reordered)["x"].shape == (2,)  # valid protobuf, not canonical
    for payload in (reordered, b"\x0a\x05garbage", b"\xff" * 40):
        assert receive_stream(_fast_stream(payload, chunk_size=3), "model_header").nonfinite is None


def test_nan_upload_is_rejected_through_the_service(node, fast_server):
    node.start_round()
    bad = {k: np.ones_like(v) for k, v in node.params.items()}
    next(iter(bad.values())).reshape(-1)[-1] = np.nan
    payload = encode_tensors(bad)
    client = CloudClient(f"127.0.0.1:{fast_server}")
    try:
        ack = client.upload(_update_header(node, payload), payload)
    finally:
        client.close()
    assert not ack.accepted and "NaN or infinity" in ack.reason
    node.finish_round()


def test_upload_the_cloud_would_refuse_is_refused_from_its_header(node, fast_server):
    """The cloud screens the update header before reading or allocating anything: a header that
    announces the wrong size (here 1.9 GB) or comes from a fog not in the round is refused with
    that reason, not after 1.9 GB were reserved and the stream came up short."""
    node.start_round()
    channel = grpc.insecure_channel(f"127.0.0.1:{fast_server}")
    raw_upload = channel.stream_unary("/fogfl.Aggregator/UploadUpdate", request_serializer=lambda b: b,
                                      response_deserializer=pb.UploadAck.FromString)
    payload = encode_tensors({k: np.zeros_like(v) for k, v in node.params.items()})
    try:
        huge = _update_header(node, payload)
        huge.total_bytes = 1_900_000_000
        frames = [pb.Chunk(update_header=huge).SerializeToString(), encode_data_chunk(b"x" * 10)]
        ack = raw_upload(iter(frames), timeout=30)
        assert not ack.accepted and "announces 1900000000 bytes" in ack.reason
        stranger = _update_header(node, payload)
        stranger.fog_id = "fog-77"
        ack = raw_upload(chunk_frames(pb.Chunk(update_header=stranger), payload), timeout=30)
        assert not ack.accepted and "not selected" in ack.reason
        ok = raw_upload(chunk_frames(pb.Chunk(update_header=_update_header(node, payload)), payload), timeout=30)
        assert ok.accepted, ok.reason
    finally:
        channel.close()
    node.finish_round()


# --------------------------------------------------------------------------- receive buffer reuse


def test_receive_buffers_are_reused_only_when_nothing_refers_to_them():
    """A buffer goes back into use only when every view of the payload it held is gone: a
    decoded array, a numpy view or the memoryview itself keeps it out of reach."""
    from protos.codec import _POOL

    rng = np.random.default_rng(11)
    tensors = [{"w": rng.normal(size=(700_000,)).astype(np.float32)} for _ in range(4)]
    payloads = [encode_tensors(t) for t in tensors]

    def receive(i):
        return receive_stream(_fast_stream(payloads[i], chunk_size=CHUNK_SIZE), "model_header").payload

    first = receive(0)
    kept_array = decode_tensors(first, copy=False, aligned=False)["w"]  # a view into the buffer
    kept_raw = np.frombuffer(receive(1), dtype=np.uint8)  # the memoryview itself is gone already
    del first
    before = _POOL.reused
    third = receive(2)
    # neither held buffer was handed out again, and what they hold is intact
    assert not np.shares_memory(np.frombuffer(third, dtype=np.uint8), kept_array)
    assert not np.shares_memory(np.frombuffer(third, dtype=np.uint8), kept_raw)
    np.testing.assert_array_equal(kept_array, tensors[0]["w"])
    assert kept_raw.tobytes() == payloads[1]
    assert third == payloads[2]
    third_arr = np.frombuffer(third, dtype=np.uint8)
    del third, third_arr
    fourth = receive(3)  # the third's buffer is free now: reused
    assert _POOL.reused > before
    assert fourth == payloads[3]
    np.testing.assert_array_equal(kept_array, tensors[0]["w"])
    assert kept_raw.tobytes() == payloads[1]


def test_a_fog_refuses_a_model_holding_nan_as_it_downloads_it():
    """The finiteness verdict found while the model arrived is used: a served model with NaN in a
    tensor fails the download with a one-line reason naming it (the fog's round loop logs it and
    goes on); the same cloud serving a sound model to another fog is downloaded normally."""
    cfg = build_config([], [("cloud.warm_start.per_class", 0), ("topology.fogs", 2)], use_env=False)

    def poison(fog_id, round_no, params, spec):
        if fog_id != "fog-0":
            return None
        bad = {k: v.copy() for k, v in params.items()}
        name = sorted(bad)[0]
        bad[name].reshape(-1)[-1] = np.nan
        return bad

    node = CloudNode(cfg, serve_transform=poison)
    server, port, _ = start_grpc_server(AggregatorServicer(node), "127.0.0.1", 0)
    client = CloudClient(f"127.0.0.1:{port}")
    try:
        node.start_round()
        with pytest.raises(WireError, match=rf"holds NaN or infinity in {sorted(node.params)[0]}"):
            client.download("fog-0", node.round_no)
        header, payload = client.download("fog-1", node.round_no)
        assert header.version == node.version and bytes(payload) == node.serve_model("fog-1")[1]
    finally:
        client.close()
        server.stop(0)


# --------------------------------------------------------------------------- single-message transfers


class _Counting(AggregatorServicer):
    def __init__(self, node):
        super().__init__(node)
        self.calls: dict[str, int] = {}

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def DownloadModel(self, request, context):  # noqa: N802
        self._count("DownloadModel")
        yield from super().DownloadModel(request, context)

    def download_frames(self, request, context):
        self._count("DownloadModel")
        yield from super().download_frames(request, context)

    def UploadUpdate(self, request_iterator, context):  # noqa: N802
        self._count("UploadUpdate")
        return super().UploadUpdate(request_iterator, context)

    def FetchModel(self, request, context):  # noqa: N802
        self._count("FetchModel")
        return super().FetchModel(request, context)

    def SubmitUpdate(self, request, context):  # noqa: N802
        self._count("SubmitUpdate")
        return super().SubmitUpdate(request, context)


class _StreamsOnly(AggregatorServicer):
    """A cloud from before the single-message methods: they answer UNIMPLEMENTED."""

    FetchModel = pb_grpc.AggregatorServicer.FetchModel
    SubmitUpdate = pb_grpc.AggregatorServicer.SubmitUpdate


@pytest.fixture
def small_node() -> CloudNode:
    cfg = build_config([], [("cloud.warm_start.per_class", 0), ("topology.fogs", 1), ("rounds", 100)], use_env=False)
    n = CloudNode(cfg)
    assert n.model_bytes <= CHUNK_SIZE
    return n


def test_a_small_model_travels_as_single_messages_and_a_large_one_as_streams(small_node, node):
    for cloud, expect in ((small_node, {"FetchModel": 2, "SubmitUpdate": 1}),
                          (node, {"FetchModel": 1, "DownloadModel": 2, "UploadUpdate": 1})):
        servicer = _Counting(cloud)
        server, port, _ = start_grpc_server(servicer, "127.0.0.1", 0)
        client = CloudClient(f"127.0.0.1:{port}")
        try:
            _round_trip(cloud, lambda c=client, n=cloud: c.download("fog-0", n.round_no), client.upload)
            cloud.start_round()
            client.download("fog-0", cloud.round_no)
            cloud.finish_round()
        finally:
            client.close()
            server.stop(0)
        # the large model: one refused FetchModel, then streams only (the client remembers)
        assert servicer.calls == expect, servicer.calls


def test_a_cloud_without_single_message_methods_is_streamed_to(small_node):
    server, port, _ = start_grpc_server(_StreamsOnly(small_node), "127.0.0.1", 0)
    client = CloudClient(f"127.0.0.1:{port}")
    try:
        _round_trip(small_node, lambda: client.download("fog-0", small_node.round_no), client.upload)
        assert not client.single_message
    finally:
        client.close()
        server.stop(0)


class _CorruptReply(AggregatorServicer):
    def FetchModel(self, request, context):  # noqa: N802
        reply = super().FetchModel(request, context)
        data = bytearray(reply.data)
        data[len(data) // 2] ^= 0x01
        reply.data = bytes(data)
        return reply


def test_single_message_transfers_are_checked_like_streams(small_node):
    """A corrupted reply fails its digest; a NaN update sent as one message is refused with the
    stream's reason, and nothing reaches the round."""
    server, port, _ = start_grpc_server(_CorruptReply(small_node), "127.0.0.1", 0)
    client = CloudClient(f"127.0.0.1:{port}")
    try:
        small_node.start_round()
        with pytest.raises(ChecksumError, match="xxh3-128"):
            client.download("fog-0", small_node.round_no)
        bad = {k: np.zeros_like(v) for k, v in small_node.params.items()}
        next(iter(bad.values())).reshape(-1)[0] = np.inf
        up = encode_tensors(bad)
        ack = client.upload(_update_header(small_node, up), up)
        assert not ack.accepted and "NaN or infinity" in ack.reason and client.single_message
        assert not small_node.current.received
        small_node.finish_round()
    finally:
        client.close()
        server.stop(0)
