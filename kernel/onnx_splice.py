"""ONNX export without re-tracing: one torch export per architecture, then byte splices.

``torch.onnx.export`` traces the module every time (milliseconds for a small MLP, far more for a
large network) although only the weights change between model versions. :class:`OnnxExporter`
exports once, finds where each parameter's bytes sit in that file (the ``raw_data`` of the graph
initializer named like the parameter) and, for every later set of parameters, copies the file
with the new bytes in those places: one ``join``, no tracing. Lengths do not change, so every
length prefix around them stays valid.

It is checked once, at construction, against a second real export with different weights: if
the two files differ anywhere but in the spliced bytes (an exporter that folds, transposes or
renames a parameter, an initializer stored as ``float_data``), the exporter says so
(``spliced`` is False) and falls back to a real export on every call. Either way the bytes are
exactly what :func:`kernel.models.export_onnx` returns for those parameters.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping

import numpy as np

from kernel.errors import ModelError
from kernel.models import build_model, export_onnx, get_params, set_params
from protos.codec import read_varint

log = logging.getLogger(__name__)

_FLOAT = 1  # onnx TensorProto.DataType.FLOAT


def _fields(buf: bytes, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, len(buf))
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos, len(buf))
            yield field, wire, value
        elif wire == 2:
            n, pos = read_varint(buf, pos, len(buf))
            if pos + n > end:
                raise ValueError("length-delimited field runs past its message")
            yield field, wire, (pos, pos + n)
            pos += n
        elif wire == 1:
            pos += 8
            yield field, wire, None
        elif wire == 5:
            pos += 4
            yield field, wire, None
        else:
            raise ValueError(f"unsupported wire type {wire}")


def float_initializers(onnx: bytes) -> dict[str, tuple[int, int]]:
    """name -> (start, end) of the ``raw_data`` of every FLOAT initializer of the main graph
    (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto name = 8, data_type = 2,
    raw_data = 9)."""
    out: dict[str, tuple[int, int]] = {}
    for field, wire, val in _fields(onnx, 0, len(onnx)):
        if field != 7 or wire != 2:
            continue
        g0, g1 = val
        for gf, gw, gval in _fields(onnx, g0, g1):
            if gf != 5 or gw != 2:
                continue
            name, dtype, raw = None, None, None
            for tf, tw, tval in _fields(onnx, *gval):
                if tf == 8 and tw == 2:
                    name = onnx[tval[0]:tval[1]].decode("utf-8", "replace")
                elif tf == 2 and tw == 0:
                    dtype = tval
                elif tf == 9 and tw == 2:
                    raw = tval
            if name is not None and dtype == _FLOAT and raw is not None:
                out[name] = raw
    return out


class OnnxExporter:
    """``exporter(params) -> ONNX bytes`` for one architecture spec (thread-safe)."""

    def __init__(self, spec: Mapping) -> None:
        self.spec = dict(spec)
        self.in_shape = list(self.spec["in_shape"])
        self._lock = threading.Lock()
        self._model = build_model(self.spec, seed=0)
        base_params = get_params(self._model)
        self._names = list(base_params)
        self._shapes = {k: tuple(v.shape) for k, v in base_params.items()}
        base = export_onnx(self._model, self.in_shape)
        self._pieces: list[bytes] = []
        self._order: list[str] = []
        self.spliced = False
        try:
            self._plan(base, base_params)
            # a second real export with other weights must equal the splice, byte for byte
            rng = np.random.default_rng(0x0DD5)
            other = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in base_params.items()}
            set_params(self._model, other)
            self.spliced = self._splice(other) == export_onnx(self._model, self.in_shape)
        except ValueError as exc:
            log.debug("ONNX splice plan failed for %s: %s", self.spec.get("arch"), exc)
        if not self.spliced:
            log.info("ONNX export of %s is not spliceable; exporting with torch every time", self.spec.get("arch"))

    def _plan(self, base: bytes, params: Mapping[str, np.ndarray]) -> None:
        found = float_initializers(base)
        spans = []
        for name, arr in params.items():
            span = found.get(name)
            if span is None or span[1] - span[0] != arr.nbytes or base[span[0]:span[1]] != _le(arr):
                raise ValueError(f"parameter {name} is not stored verbatim")
            spans.append((span, name))
        spans.sort()
        pos = 0
        for (start, end), name in spans:
            self._pieces.append(base[pos:start])
            self._order.append(name)
            pos = end
        self._pieces.append(base[pos:])

    def _splice(self, params: Mapping[str, np.ndarray]) -> bytes:
        parts: list[bytes] = []
        for piece, name in zip(self._pieces, self._order, strict=False):
            parts += [piece, _le(params[name])]
        parts.append(self._pieces[-1])
        return b"".join(parts)

    def __call__(self, params: Mapping[str, np.ndarray]) -> bytes:
        """The ONNX file of this architecture with ``params`` (a ``get_params``-style mapping)."""
        if self.spliced:
            if list(params) != self._names:
                raise ModelError("parameter names differ from the architecture's")
            for k, p in self._shapes.items():
                if tuple(params[k].shape) != p:
                    raise ModelError(f"parameter {k}: shape {tuple(params[k].shape)} != architecture's {p}")
            return self._splice(params)
        with self._lock:
            set_params(self._model, params)
            return export_onnx(self._model, self.in_shape)


def _le(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()


_EXPORTERS: dict[str, OnnxExporter] = {}  # arch JSON -> exporter, shared by every node of a process
_EXPORTERS_LOCK = threading.Lock()
_MAX_EXPORTERS = 8


def exporter_for(arch: str | Mapping) -> OnnxExporter:
    """The process's exporter for an architecture (a spec, or its JSON as in model headers):
    built on first use, then shared. Raises what :func:`kernel.models.build_model` raises for a
    bad spec (ModelError), ValueError for malformed JSON, KeyError for a spec without in_shape."""
    key = json.dumps(json.loads(arch) if isinstance(arch, str) else dict(arch), sort_keys=True)
    with _EXPORTERS_LOCK:
        ex = _EXPORTERS.get(key)
        if ex is None:
            ex = OnnxExporter(json.loads(key))
            if len(_EXPORTERS) >= _MAX_EXPORTERS:
                _EXPORTERS.pop(next(iter(_EXPORTERS)))
            _EXPORTERS[key] = ex
        return ex
