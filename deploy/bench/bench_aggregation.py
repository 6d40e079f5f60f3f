"""Streaming FedAvg vs a plain read pass and vs the naive list-based weighted reduce.

50 updates of a ~2 M-parameter MLP (784-1024-1024-128-10). Targets: FedAvg (begin_round, 50 ×
add_update, end_round) takes ≤ 1.3× the time of one plain read pass over the same inputs (summing
every update array once), is ≥ 3× faster than the naive reduce (scale every update, then sum the
list), and its peak extra memory (tracemalloc, output model included) is ≤ 2 models. Each timing
is the minimum over interleaved repeats, so that load from other processes hurts all alike. The
float64-accumulator variant is measured for information."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from cloud.strategies import FedAvg

SHAPES = {
    "0.weight": (1024, 784), "0.bias": (1024,),
    "1.weight": (1024, 1024), "1.bias": (1024,),
    "2.weight": (128, 1024), "2.bias": (128,),
    "3.weight": (10, 128), "3.bias": (10,),
}


def _inputs(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], list[int]]:
    rng = np.random.default_rng(seed)
    g = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    ups = [{k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]
    ns = [int(v) for v in rng.integers(20, 2000, n)]
    return g, ups, ns


def read_pass(g, ups, ns) -> float:
    t = 0.0
    for u in ups:
        for a in u.values():
            t += float(a.sum())
    return t


def sum_pass(g, ups, ns) -> dict[str, np.ndarray]:
    acc = {k: np.zeros(v.shape, np.float32) for k, v in g.items()}
    for u in ups:
        for k, a in u.items():
            np.add(acc[k], a, out=acc[k])
    return acc


def naive(g, ups, ns) -> dict[str, np.ndarray]:
    total = float(sum(ns))
    scaled = [{k: a * (n / total) for k, a in u.items()} for u, n in zip(ups, ns, strict=True)]
    return {k: g[k] + sum(s[k] for s in scaled) for k in g}


def fedavg(precision: str) -> Callable:
    def run(g, ups, ns) -> dict[str, np.ndarray]:
        s = FedAvg(precision)  # type: ignore[arg-type]
        s.begin_round(g, {"arch": "mlp"})
        for i, (u, n) in enumerate(zip(ups, ns, strict=True)):
            s.add_update(f"fog-{i}", u, n, "delta", {})
        return s.end_round(1.0)

    return run


def _peak_extra(fn: Callable, *args) -> int:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn(*args)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    del out
    return peak


def run(quick: bool = False) -> dict:
    n = 10 if quick else 50
    repeats = 3 if quick else 7
    g, ups, ns = _inputs(n)
    model_bytes = sum(v.nbytes for v in g.values())
    methods = {"read_pass": read_pass, "sum_pass": sum_pass, "fedavg": fedavg("float32"),
               "fedavg_f64": fedavg("float64"), "naive": naive}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            out = fn(g, ups, ns)
            times[name].append(time.perf_counter() - t0)
            del out
    best = {k: min(v) for k, v in times.items()}

    # accuracy against a float64 reference
    total = float(sum(ns))
    ref = {k: g[k].astype(np.float64) + sum(u[k].astype(np.float64) * w for u, w in zip(ups, ns, strict=True)) / total
           for k in g}
    err = {}
    for prec in ("float32", "float64"):
        out = fedavg(prec)(g, ups, ns)
        err[prec] = max(float(np.abs(out[k] - ref[k]).max()) for k in g)
    naive_out = naive(g, ups, ns)
    err["naive"] = max(float(np.abs(naive_out[k] - ref[k]).max()) for k in g)
    del naive_out
    mean_mag = float(np.mean([np.abs(ref[k] - g[k]).mean() for k in g]))
    del ref

    mem = {name: _peak_extra(methods[name], g, ups, ns) / model_bytes for name in ("fedavg", "fedavg_f64", "naive")}

    ratios = {
        "time_vs_read_pass": best["fedavg"] / best["read_pass"],
        "speedup_vs_naive": best["naive"] / best["fedavg"],
        "peak_extra_models": mem["fedavg"],
    }
    info = {
        "time_vs_sum_pass": best["fedavg"] / best["sum_pass"],
        "f64_time_vs_read_pass": best["fedavg_f64"] / best["read_pass"],
        "f64_speedup_vs_naive": best["naive"] / best["fedavg_f64"],
        "f64_peak_extra_models": mem["fedavg_f64"],
        "naive_peak_extra_models": mem["naive"],
    }
    target = {"time_vs_read_pass": "<= 1.3", "speedup_vs_naive": ">= 3", "peak_extra_models": "<= 2"}
    ok = (ratios["time_vs_read_pass"] <= 1.3 and ratios["speedup_vs_naive"] >= 3
          and ratios["peak_extra_models"] <= 2)
    summary = (f"{n} updates x {model_bytes // 4 / 1e6:.2f} M params: fedavg {best['fedavg'] * 1e3:.1f} ms = "
               f"{ratios['time_vs_read_pass']:.2f}x read pass, {ratios['speedup_vs_naive']:.1f}x faster than naive, "
               f"peak {ratios['peak_extra_models']:.2f} models; max err {err['float32']:.1e} "
               f"(float64 accumulator: {info['f64_time_vs_read_pass']:.2f}x read, "
               f"{info['f64_speedup_vs_naive']:.1f}x naive, {info['f64_peak_extra_models']:.2f} models, "
               f"err {err['float64']:.1e})")
    return {
        "name": "aggregation",
        "ratios": ratios,
        "info": info,
        "target": target,
        "pass": bool(ok),
        "summary": summary,
        "ms": {k: round(v * 1e3, 2) for k, v in best.items()},
        "max_abs_error": err,
        "mean_abs_aggregate": mean_mag,
        "updates": n,
        "params": model_bytes // 4,
        "repeats": repeats,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
