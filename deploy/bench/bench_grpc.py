"""Model download and update upload over the project's gRPC service (CloudNode + Aggregator
servicer + the fog's CloudClient: chunking, XXH3-128 digests, assembly, decoding, checks, admission
into the aggregation) vs a bare gRPC stream of 1 MiB byte chunks on loopback. Target: >= 80 % of
the bare throughput for a 50 MB model, both directions.

The two ends run in two processes, as a fog and the cloud do: this process holds the servers
(the cloud node with its service, and a bare bytes-in/bytes-out service), a child process the
clients (the fog's ``CloudClient`` and a bare client that only counts what it receives). In one
process both ends would share one interpreter lock, a handicap no deployment has. The child times
each operation (wall clock, and its own CPU); the server's CPU is this process's. Operations are
interleaved within each repetition (the order alternates), so load changes hit both sides alike.
Both processes tune malloc as the cloud and fog processes do (``kernel.runtime.tune_malloc``); the
bare ends share those processes. The upload is timed until the ack, i.e. it includes the cloud's checks and admission of the update
(the fold-in runs after the ack on the cloud's fold worker, and ``finish_round`` waits for it)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent import futures

import grpc

_CHUNK = 1 << 20


def _ident(b: bytes) -> bytes:
    return b


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

    handler = grpc.method_handlers_generic_handler("bare.Bytes", {
        "Download": grpc.unary_stream_rpc_method_handler(download, request_deserializer=_ident,
                                                         response_serializer=_ident),
        "Upload": grpc.stream_unary_rpc_method_handler(upload, request_deserializer=_ident,
                                                       response_serializer=_ident),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


# ------------------------------------------------------------------------------------ client side


def _client_main(cloud_port: int, bare_port: int) -> int:
    """The child: reads one command per line on stdin, answers one JSON line on stdout."""
    from fog.service import CloudClient
    from kernel.runtime import tune_malloc
    from protos import fogfl_pb2 as pb

    tune_malloc()  # as `fogfl fog` does; the bare client shares this process
    client = CloudClient(f"127.0.0.1:{cloud_port}")
    client.wait_ready(30)
    ch = grpc.insecure_channel(f"127.0.0.1:{bare_port}")
    bare_dl = ch.unary_stream("/bare.Bytes/Download", request_serializer=_ident, response_deserializer=_ident)
    bare_ul = ch.stream_unary("/bare.Bytes/Upload", request_serializer=_ident, response_deserializer=_ident)
    _, model = client.download("fog-0", 0)
    payload = bytes(model)  # the update the fog uploads: a payload of the model's size and layout
    size = len(payload)

    def bare_down(_args):
        return sum(len(c) for c in bare_dl(b""))

    def bare_up(_args):
        view = memoryview(payload)
        ack = bare_ul(bytes(view[s : s + _CHUNK]) for s in range(0, size, _CHUNK))
        return int.from_bytes(ack, "little")

    def down(args):
        _, p = client.download("fog-0", int(args[0]))
        return len(p)

    def up(args):
        rnd, version = int(args[0]), int(args[1])
        h = pb.UpdateHeader(fog_id="fog-0", round=rnd, base_version=version, num_samples=10,
                            update_kind="delta", total_bytes=size, labels_total=10)
        ack = client.upload(h, payload)
        if not ack.accepted:
            raise RuntimeError(f"update rejected: {ack.reason}")
        return size

    ops = {"bare_down": bare_down, "bare_up": bare_up, "down": down, "up": up}
    print(json.dumps({"ready": size}), flush=True)
    for line in sys.stdin:
        name, *args = line.split()
        if name == "quit":
            break
        w0, c0 = time.perf_counter(), time.process_time()
        n = ops[name](args)
        print(json.dumps({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0, "bytes": n}),
              flush=True)
    client.close()
    ch.close()
    return 0


# ------------------------------------------------------------------------------------ server side


def run(quick: bool = False) -> dict:
    from cloud.node import CloudNode
    from cloud.service import AggregatorServicer, start_grpc_server
    from kernel.config import build_config
    from kernel.runtime import tune_malloc

    malloc_tuned = tune_malloc()  # as `fogfl cloud` does; the bare server shares this process

    hidden = 1600 if quick else 16000  # mnist 784 -> hidden -> 10: 12.7 M params = 50.9 MB at 16 000
    cfg = build_config([], [("data.dataset", "mnist5k"), ("model.hidden", hidden), ("cloud.warm_start.per_class", 0),
                            ("topology.fogs", 1), ("rounds", 1000)], use_env=False)
    node = CloudNode(cfg)
    server, port, _ = start_grpc_server(AggregatorServicer(node), "127.0.0.1", 0)
    _, payload = node.serve_model("fog-0")
    size = len(payload)
    bare, bare_port = _bare_server(payload)
    child = subprocess.Popen([sys.executable, "-m", "deploy.bench.bench_grpc", "--client", str(port), str(bare_port)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert child.stdin is not None and child.stdout is not None

    def ask(line: str) -> dict:
        child.stdin.write(line + "\n")  # type: ignore[union-attr]
        reply = child.stdout.readline()  # type: ignore[union-attr]
        if not reply:
            raise RuntimeError(f"the client process died (exit {child.wait(5)})")
        return json.loads(reply)

    def op(name: str) -> tuple[float, float, float]:
        """(wall, client CPU, server CPU) of one operation."""
        if name == "up":
            node.start_round()
            line = f"up {node.round_no} {node.version}"
        elif name == "down":
            line = f"down {node.round_no}"
        else:
            line = name
        c0 = time.process_time()
        r = ask(line)
        server_cpu = time.process_time() - c0
        if name == "up":
            node.finish_round()  # waits for the fold-in; not timed
        assert r["bytes"] == size, (name, r)
        return r["wall"], r["cpu"], server_cpu

    try:
        ready = json.loads(child.stdout.readline() or "{}")
        if ready.get("ready") != size:
            raise RuntimeError(f"the client process did not start ({ready})")
        # 31: the bare stream alone ranges 17-35 ms per 51 MB here, and with 11 repetitions the
        # ratio of medians moved 0.70-0.96 between runs (pooled over 55: 0.85 down, 0.92 up)
        reps = 3 if quick else 31
        names = ["bare_down", "down", "bare_up", "up"]
        for name in names:
            op(name)  # warm-up
        wall: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}
        load_before = os.getloadavg()[0]
        for rep in range(reps):
            order = names if rep % 2 == 0 else ["down", "bare_down", "up", "bare_up"]
            for name in order:
                w, cc, sc = op(name)
                wall[name].append(w)
                cpu[name].append(cc + sc)
        load_after = os.getloadavg()[0]
        child.stdin.write("quit\n")
        child.stdin.flush()
        child.wait(30)
        rss_mib = {"server_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "client_process": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    finally:
        if child.poll() is None:
            child.kill()
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
        "processes": "servers in the bench process, clients in a child process",
        "throughput_mb_s": {k: round(mb / v, 1) for k, v in res.items()},
        "wall_ms": {k: [round(x * 1e3, 1) for x in v] for k, v in wall.items()},
        "cpu_ms_median_both_ends": {k: round(v, 1) for k, v in cpu_ms.items()},
        "ratios": {"download_vs_bare": round(ratio_down, 3), "upload_vs_bare": round(ratio_up, 3)},
        "cpu_ratios": {"download_vs_bare": round(cpu_ms["bare_down"] / cpu_ms["down"], 3),
                       "upload_vs_bare": round(cpu_ms["bare_up"] / cpu_ms["up"], 3)},
        "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
        "cpus": os.cpu_count(),
        "malloc_tuned": malloc_tuned,
        "peak_rss_mib": {k: round(v) for k, v in rss_mib.items()},
        "target": ">= 0.80 of the bare 1 MiB-chunk stream, both directions",
        "pass": ok,
        "summary": f"{mb:.0f} MB model: download {ratio_down:.2f}x, upload {ratio_up:.2f}x of bare gRPC "
                   f"({mb / res['down']:.0f} vs {mb / res['bare_down']:.0f} MB/s down, "
                   f"{mb / res['up']:.0f} vs {mb / res['bare_up']:.0f} MB/s up; CPU of both ends "
                   f"{cpu_ms['down']:.0f} vs {cpu_ms['bare_down']:.0f} ms down, "
                   f"{cpu_ms['up']:.0f} vs {cpu_ms['bare_up']:.0f} ms up; load {load_before:.1f} on "
                   f"{os.cpu_count()} CPUs)",
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="client half of the gRPC transfer benchmark (internal)")
    ap.add_argument("--client", nargs=2, type=int, metavar=("CLOUD_PORT", "BARE_PORT"), required=True)
    a = ap.parse_args()
    sys.exit(_client_main(*a.client))
