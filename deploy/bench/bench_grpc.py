"""Model download and update upload over the project's gRPC service (CloudNode + Aggregator
servicer + the fog's CloudClient: chunking, sha256, decoding, checks, aggregation fold-in) vs a
bare gRPC stream of 1 MiB byte chunks on loopback. Target: >= 80 % of the bare throughput for a
50 MB model.

Everything runs in this one process (client, servers), so ``time.process_time`` around an operation
is the CPU it cost all threads together; it is saved next to the wall-clock times because on a
shared, saturated machine the wall-clock ratio follows the CPU ratio. The four operations are
interleaved within each repetition (the order alternates), so load changes hit both sides alike.
The upload's time runs until the ack, i.e. includes ``CloudNode.receive_update`` (decode, checks,
fold-in of the update by the aggregation strategy)."""

from __future__ import annotations

import os
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

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def since(t0: tuple[float, float]) -> tuple[float, float]:
        return time.perf_counter() - t0[0], time.process_time() - t0[1]

    def t_bare_down():
        t = clock()
        n = sum(len(c) for c in bare_dl(b""))
        dt = since(t)
        assert n == size
        return dt

    def t_bare_up():
        view = memoryview(payload)
        t = clock()
        bare_ul(bytes(view[s : s + _CHUNK]) for s in range(0, size, _CHUNK))
        return since(t)

    def t_down():
        t = clock()
        _, p = client.download("fog-0", node.round_no)
        dt = since(t)
        assert len(p) == size
        return dt

    def t_up():
        node.start_round()
        h = pb.UpdateHeader(fog_id="fog-0", round=node.round_no, base_version=node.version, num_samples=10,
                            update_kind="delta", total_bytes=size, labels_total=10)
        t = clock()
        ack = client.upload(h, payload)
        dt = since(t)
        assert ack.accepted, ack.reason
        node.finish_round()
        return dt

    reps = 3 if quick else 11
    ops = {"bare_down": t_bare_down, "down": t_down, "bare_up": t_bare_up, "up": t_up}
    for fn in ops.values():
        fn()  # warm-up
    wall: dict[str, list[float]] = {k: [] for k in ops}
    cpu: dict[str, list[float]] = {k: [] for k in ops}
    load_before = os.getloadavg()[0]
    for rep in range(reps):
        order = list(ops) if rep % 2 == 0 else ["down", "bare_down", "up", "bare_up"]
        for name in order:
            w, c = ops[name]()
            wall[name].append(w)
            cpu[name].append(c)
    load_after = os.getloadavg()[0]
    client.close()
    ch.close()
    server.stop(0).wait(5)
    bare.stop(0).wait(5)
    res = {k: statistics.median(v) for k, v in wall.items()}
    cpu_ms = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    mb = size / 1e6
    ratio_down = res["bare_down"] / res["down"]
    ratio_up = res["bare_up"] / res["up"]
    ok = ratio_down >= 0.8 and ratio_up >= 0.8
    return {
        "model_mb": round(mb, 1),
        "reps": reps,
        "throughput_mb_s": {k: round(mb / v, 1) for k, v in res.items()},
        "wall_ms": {k: [round(x * 1e3, 1) for x in v] for k, v in wall.items()},
        "cpu_ms_median": {k: round(v, 1) for k, v in cpu_ms.items()},
        "ratios": {"download_vs_bare": round(ratio_down, 3), "upload_vs_bare": round(ratio_up, 3)},
        "cpu_ratios": {"download_vs_bare": round(cpu_ms["bare_down"] / cpu_ms["down"], 3),
                       "upload_vs_bare": round(cpu_ms["bare_up"] / cpu_ms["up"], 3)},
        "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
        "cpus": os.cpu_count(),
        "target": ">= 0.80 of the bare 1 MiB-chunk stream, both directions",
        "pass": ok,
        "summary": f"{mb:.0f} MB model: download {ratio_down:.2f}x, upload {ratio_up:.2f}x of bare gRPC "
                   f"({mb / res['down']:.0f} vs {mb / res['bare_down']:.0f} MB/s down, "
                   f"{mb / res['up']:.0f} vs {mb / res['bare_up']:.0f} MB/s up; CPU "
                   f"{cpu_ms['down']:.0f} vs {cpu_ms['bare_down']:.0f} ms down, "
                   f"{cpu_ms['up']:.0f} vs {cpu_ms['bare_up']:.0f} ms up; load {load_before:.1f} on "
                   f"{os.cpu_count()} CPUs)",
    }
