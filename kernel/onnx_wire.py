"""Reading an ONNX file's protobuf where it matters to fogfl, without the ``onnx`` package and
without torch (the edge imports it): which bytes hold each float initializer's values.

Both :mod:`kernel.onnx_splice` (the cloud and fogs write a new model version by replacing those
bytes) and :class:`edge.classifier.OnnxClassifier` (an edge that already runs the same graph only
swaps the weights) rely on the same fact: two versions of one architecture differ only there.
Malformed input raises ValueError.
"""

from __future__ import annotations

from protos.codec import read_varint

_FLOAT = 1  # onnx TensorProto.DataType.FLOAT


def fields(buf: bytes, start: int, end: int):
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
    for field, wire, val in fields(onnx, 0, len(onnx)):
        if field != 7 or wire != 2:
            continue
        g0, g1 = val
        for gf, gw, gval in fields(onnx, g0, g1):
            if gf != 5 or gw != 2:
                continue
            name, dtype, raw = None, None, None
            for tf, tw, tval in fields(onnx, *gval):
                if tf == 8 and tw == 2:
                    name = onnx[tval[0]:tval[1]].decode("utf-8", "replace")
                elif tf == 2 and tw == 0:
                    dtype = tval
                elif tf == 9 and tw == 2:
                    raw = tval
            if name is not None and dtype == _FLOAT and raw is not None:
                out[name] = raw
    return out
