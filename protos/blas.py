"""BLAS level-1 calls on the calling thread (the transfer's NaN/inf scan, the cloud's fold).

Level-1 calls on L2-sized pieces gain nothing from threads, and OpenBLAS's hand-off to its own
threads made them up to 20x slower on a busy machine (a transfer's scan doubled its CPU, a fold
of 50 updates took seconds). :func:`one_blas_thread` runs them on the caller's thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController

_BLAS_LIBS: list | None = None  # threadpoolctl's controllers of the BLAS libraries loaded


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """A library already at one thread (a node process: the launcher sets ``OMP_NUM_THREADS=1``)
    is left alone (~1 us: two thread counts read); the others are set to one and restored after
    (~5 us). The count is the library's, not the thread's: two threads inside this at once may
    see each other's setting, which costs speed, never a result. (``ThreadpoolController.limit``
    did the same in ~12 us a call.)"""
    global _BLAS_LIBS
    if _BLAS_LIBS is None:
        _BLAS_LIBS = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    changed = []
    try:
        for lib in _BLAS_LIBS:
            n = lib.get_num_threads()
            if n is not None and n != 1:
                lib.set_num_threads(1)
                changed.append((lib, n))
        yield
    finally:
        for lib, n in changed:
            lib.set_num_threads(n)
