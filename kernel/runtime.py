"""Process-wide settings for a process that runs one node (``fogfl cloud|fog|edge|tap|run``).

Library code never changes the process it is imported into: the node services call
:func:`settle_heap`, which acts only once the process's entry point has claimed the process with
:func:`own_process`; :func:`tune_malloc` is called by entry points only (``own_process(malloc=True)``,
the transfer benchmark's two processes). The standard library only (the edge imports this).

- :func:`tune_malloc` keeps gRPC's message buffers in the heap for reuse.
- :func:`pin_cpus` restricts the process to some CPUs (``--cpus`` of ``fogfl cloud|fog|edge``;
  ``fogfl run`` places each fog with its edges that way: ``deploy.launcher.place_fog_groups``).
- :func:`settle_heap`, called by a node once it is built and about to go online, runs one full
  garbage collection and moves every object that survives it (the imported modules, above all
  torch's, scikit-learn's and onnxruntime's) into the permanent generation (``gc.freeze``), where
  later collections never scan it.

Why the second: CPython's first full collection comes a few rounds into a run, once enough
objects have been allocated since startup, and scans everything imported. Measured on the small
preset (2 fogs x 2 edges, 7 node processes on 2 cores, before this): a full collection held
the GIL for ~200 ms of CPU in the cloud, ~150 ms in each fog and ~80 ms in each edge, all of them
within rounds 1-3; the cloud's stalled its gRPC server for 0.6 s of wall time, and round 3 took
620-700 ms instead of ~30 ms in two runs of two. After the freeze a full collection scans only
what was allocated since."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import time

from kernel.errors import ConfigError

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_owned = False


def own_process(malloc: bool = False) -> None:
    """Claim the process for one node: :func:`settle_heap` acts from now on; ``malloc``: also
    :func:`tune_malloc` (the tiers that move models over gRPC)."""
    global _owned
    _owned = True
    if malloc:
        tune_malloc()


def owned() -> bool:
    return _owned


def settle_heap() -> float:
    """In an owned process: one full collection, then freeze what survives (see the module's
    docstring). Returns the seconds it took (0.0, nothing done, when the process is not owned:
    a test or a notebook that runs nodes in threads keeps its own collector untouched)."""
    if not _owned:
        return 0.0
    t = time.perf_counter()
    gc.collect()
    gc.freeze()
    took = time.perf_counter() - t
    log.debug("heap settled: %d objects frozen in %.0f ms", gc.get_freeze_count(), took * 1000)
    return took


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep gRPC's message buffers in the heap for reuse, in a process that moves large models
    (the cloud, a fog, the tap). Returns False where the C library is not glibc (nothing done).

    gRPC allocates a buffer per 1 MiB message. By default glibc serves such sizes with ``mmap``
    (until its adaptive threshold catches up) and returns freed heap top to the OS past 128 KiB,
    so the next transfer's buffers are fresh pages, one fault per 4 KiB. With allocations below
    ``mmap_threshold`` from the heap and up to ``trim_threshold`` of freed memory kept, they are
    reused. Measured on the 51 MB download (three interleaved runs each): our client and server
    moved 1131-1185 MB/s against 1020-1097 MB/s, with 73-78 ms of CPU (both ends) against
    79-83 ms; the upload did not change measurably; peak RSS of either process within 25 MiB.
    The cost is resident memory: up to ``trim_threshold`` freed bytes may be kept.

    ``mmap_threshold`` is 32 MiB, the largest glibc takes: setting one switches glibc's adaptive
    threshold off for good, and at 4 MiB (until fogfl 0.4) every tensor of 4 MiB or more (a
    1024 x 1024 float32 layer) was served by ``mmap``, fresh pages each time, such as the FedAvg
    accumulator the cloud allocates each round: on the aggregation benchmark's inputs (50 updates
    of a 2 M-parameter model, two runs each) FedAvg took 25.3-29.2 ms at 4 MiB against
    23.8-24.6 ms at 32 MiB (glibc's default: 24.3-25.3 ms)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        gnu = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    del gnu
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    if not ok:
        log.debug("mallopt refused the thresholds; malloc left as it was")
    return ok


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPU numbers written as ``taskset -c`` and Linux's ``cpuset`` do: ``"0"``, ``"0,2"``,
    ``"0-3,6"``. A :class:`ConfigError` on anything else."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if sep else int(lo)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise ConfigError(f"--cpus {text!r}: expected CPU numbers such as 0 or 0,2 or 0-3") from None
    return frozenset(cpus)


def format_cpu_list(cpus: set[int] | frozenset[int]) -> str:
    """The shortest :func:`parse_cpu_list` spelling of ``cpus`` (``{0, 1, 2, 5}`` -> ``"0-2,5"``)."""
    out: list[str] = []
    for c in sorted(cpus):
        if out and out[-1].rsplit("-", 1)[-1] == str(c - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)


def usable_cpus() -> frozenset[int]:
    """The CPUs this process may run on (its affinity mask: a cgroup cpuset or ``taskset``
    narrows it), or all of ``os.cpu_count()`` where the OS has no affinity call."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def pin_cpus(cpus: frozenset[int]) -> None:
    """Run this process, and every thread it starts from now on, on ``cpus`` only. Call it first
    thing in a node's entry point, before any thread exists (threads inherit the mask they are
    created with). A :class:`ConfigError` when the OS cannot (not Linux) or when ``cpus`` is
    empty or holds a CPU this process may not use."""
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("--cpus: this operating system cannot restrict a process to CPUs (Linux only)")
    usable = usable_cpus()
    if not cpus or not cpus <= usable:
        raise ConfigError(f"--cpus {format_cpu_list(cpus)}: this process may only use CPUs "
                          f"{format_cpu_list(usable)}")
    os.sched_setaffinity(0, cpus)
    log.info("pinned to CPUs %s", format_cpu_list(cpus))
