"""Model download and update upload over the project's gRPC service (CloudNode + Aggregator
servicer + the fog's CloudClient: chunking, sha256, decoding, checks, aggregation fold-in) vs a
bare gRPC stream of 1 MiB byte chunks on loopback. Target: >= 80 % of the bare throughput for a
50 MB model."""

from __future__ import annotations

import statistics
import time
from concurrent import futures

import grpc

from cloud.node import CloudNode
from cloud.service import AggregatorServicer, start_grpc_server
from fog.service import CloudClient
from kernel.config import build_config
from protos import fogfl_pb2 as pb

_CHUNK = 1 << 20


def _bare_server(payload: bytes):
    """A generic bytes-in/bytes-out streaming service: no protobuf, no hashing."""
    def download(request, context):
        view = memoryview(payload)
        for s in range(0, len(view), _CHUNK):
            yield bytes(view[s : s + _CHUNK])

    def upload(request_iterator, context):
        n = 0
        for chunk in request_iterator:
            n += len(chunk)
        return n.to_bytes(8, "little")

    ident = lambda b: b  # noqa: E731
    handler = grpc.method_handlers_generic_handler("bare.Bytes", {
        "Download": grpc.unary_stream_rpc_method_handler(download, request_deserializer=ident, response_serializer=ident),
        "Upload": grpc.stream_unary_rpc_method_handler(upload, request_deserializer=ident, response_serializer=ident),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def run(quick: bool = False) -> dict:
    hidden = 1600 if quick else 16000  # mnist 784 -> hidden -> 10: 12.7 M params = 50.9 MB at 16 000
    cfg = build_config([], [("data.dataset", "mnist5k"), ("model.hidden", hidden), ("cloud.warm_start.per_class", 0),
                            ("topology.fogs", 1), ("rounds", 1000)], use_env=False)
    node = CloudNode(cfg)
    server, port, _ = start_grpc_server(AggregatorServicer(node), "127.0.0.1", 0)
    client = CloudClient(f"127.0.0.1:{port}")
    client.wait_ready(10)
    header0, payload = node.serve_model("fog-0")
    size = len(payload)
    bare, bare_port = _bare_server(payload)
    ch = grpc.insecure_channel(f"127.0.0.1:{bare_port}")
    ident = lambda b: b  # noqa: E731
    bare_dl = ch.unary_stream("/bare.Bytes/Download", request_serializer=ident, response_deserializer=ident)
    bare_ul = ch.stream_unary("/bare.Bytes/Upload", request_serializer=ident, response_deserializer=ident)

    def t_bare_down():
        t = time.perf_counter()
        n = sum(len(c) for c in bare_dl(b""))
        assert n == size
        return time.perf_counter() - t

    def t_bare_up():
        view = memoryview(payload)
        t = time.perf_counter()
        bare_ul(bytes(view[s : s + _CHUNK]) for s in range(0, size, _CHUNK))
        return time.perf_counter() - t

    def t_down():
        t = time.perf_counter()
        _, p = client.download("fog-0", node.round_no)
        assert len(p) == size
        return time.perf_counter() - t

    def t_up():
        node.start_round()
        h = pb.UpdateHeader(fog_id="fog-0", round=node.round_no, base_version=node.version, num_samples=10,
                            update_kind="delta", total_bytes=size, labels_total=10)
        t = time.perf_counter()
        ack = client.upload(h, payload)
        dt = time.perf_counter() - t
        assert ack.accepted, ack.reason
        node.finish_round()
        return dt

    reps = 3 if quick else 5
    res = {}
    for name, fn in (("bare_down", t_bare_down), ("down", t_down), ("bare_up", t_bare_up), ("up", t_up)):
        fn()  # warm-up
        res[name] = statistics.median(fn() for _ in range(reps))
    client.close()
    ch.close()
    server.stop(0)
    bare.stop(0)
    mb = size / 1e6
    ratio_down = res["bare_down"] / res["down"]
    ratio_up = res["bare_up"] / res["up"]
    ok = ratio_down >= 0.8 and ratio_up >= 0.8
    return {
        "model_mb": round(mb, 1),
        "throughput_mb_s": {k: round(mb / v, 1) for k, v in res.items()},
        "ratios": {"download_vs_bare": round(ratio_down, 3), "upload_vs_bare": round(ratio_up, 3)},
        "target": ">= 0.80 of the bare 1 MiB-chunk stream, both directions",
        "pass": ok,
        "summary": f"{mb:.0f} MB model: download {ratio_down:.2f}x, upload {ratio_up:.2f}x of bare gRPC "
                   f"({mb / res['down']:.0f} vs {mb / res['bare_down']:.0f} MB/s down, "
                   f"{mb / res['up']:.0f} vs {mb / res['bare_up']:.0f} MB/s up)",
    }
