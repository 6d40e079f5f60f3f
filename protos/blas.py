"""BLAS level-1 calls on the calling thread (the transfer's NaN/inf scan, the cloud's fold).

Level-1 calls on L2-sized pieces gain nothing from threads, and OpenBLAS's hand-off to its own
threads made them up to 20x slower on a busy machine (a transfer's scan doubled its CPU, a fold
of 50 updates took seconds). :func:`one_blas_thread` runs them on the caller's thread."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from threadpoolctl import ThreadpoolController


class _Knob:
    """One BLAS library's thread count. For OpenBLAS, its own ``openblas_get/set_num_threads``
    called through ctypes (~0.1 and ~0.2 us); otherwise, or if they cannot be found, threadpoolctl's
    controller (~0.4 and ~0.8 us, with Python around each call)."""

    __slots__ = ("get", "set")

    def __init__(self, lib) -> None:
        self.get: Callable[[], int | None] = lib.get_num_threads
        self.set: Callable[[int], object] = lib.set_num_threads
        if getattr(lib, "internal_api", None) != "openblas":
            return
        try:  # threadpoolctl resolves the library's symbol prefix and suffix (scipy_..._64_ builds)
            get = lib._get_symbol("openblas_get_num_threads")
            set_ = lib._get_symbol("openblas_set_num_threads")
        except Exception:  # noqa: BLE001 - a threadpoolctl without this helper: keep its controller
            return
        if get is None or set_ is None:
            return
        get.restype, get.argtypes = ctypes.c_int, []
        set_.restype, set_.argtypes = None, [ctypes.c_int]
        self.get, self.set = get, set_


_KNOBS: list[_Knob] | None = None  # the BLAS libraries loaded when first asked


def _knobs() -> list[_Knob]:
    global _KNOBS
    if _KNOBS is None:
        _KNOBS = [_Knob(lib) for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    return _KNOBS


class one_blas_thread:  # noqa: N801 - used as a function: ``with one_blas_thread(): ...``
    """A library already at one thread (a node process: the launcher sets ``OMP_NUM_THREADS=1``)
    is left alone (one thread count read, ~0.1 us with OpenBLAS); the others are set to one and
    restored on exit (~0.5 us). The count is the library's, not the thread's: two threads inside
    this at once may see each other's setting, which costs speed, never a result. The libraries
    are those loaded at the first use. (A generator context over threadpoolctl's controllers took
    ~6 us a use where BLAS ran two threads, 0.3 ms of a 50-update fold; ``ThreadpoolController.limit``
    ~12 us.)"""

    __slots__ = ("_changed",)

    def __init__(self) -> None:
        self._changed: list[tuple[_Knob, int]] = []

    def __enter__(self) -> None:
        for knob in _knobs():
            n = knob.get()
            if n is not None and n != 1:
                knob.set(1)
                self._changed.append((knob, n))

    def __exit__(self, *exc: object) -> None:
        for knob, n in self._changed:
            knob.set(n)
        self._changed.clear()
