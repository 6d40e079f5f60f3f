"""An ONNX model behind scikit-learn's classifier protocol, so that modAL's query strategies (which
only call ``predict_proba``) run on it unchanged.

The ONNX graph is the one ``kernel.models.export_onnx`` writes: input ``x`` float32 (n, C, H, W)
with a dynamic batch axis and static C, H, W; output ``logits`` (n, K). Probabilities are the
softmax of the logits. The edge never trains: :meth:`OnnxClassifier.fit` raises.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
from sklearn.base import BaseEstimator, ClassifierMixin

from kernel.errors import ModelError

log = logging.getLogger(__name__)

INPUT_NAME = "x"
OUTPUT_NAME = "logits"
_BATCH = 2048  # rows per onnxruntime call: bounds memory on a Pi-sized device


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for any finite logits (the row max is subtracted)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class OnnxClassifier(ClassifierMixin, BaseEstimator):
    """Inference-only classifier over ONNX bytes.

    ``classes_`` is ``arange(K)`` (the models are trained on integer labels 0..K-1). Input may be
    (n, C, H, W) or flat (n, C*H*W); modAL's batch strategies pass flat rows.
    Construction checks the graph (one float32 input ``x`` of rank 4 with fixed C, H, W; an output
    ``logits`` of rank 2) and runs it once on a zero sample; anything wrong raises
    :class:`~kernel.errors.ModelError` with a one-line message.
    """

    def __init__(self, onnx: bytes, threads: int = 1) -> None:
        self.onnx = onnx
        self.threads = threads
        self._build()

    # -- construction ---------------------------------------------------------------------------
    def _build(self) -> None:
        if not isinstance(self.onnx, (bytes, bytearray, memoryview)) or len(self.onnx) == 0:
            raise ModelError("ONNX model is empty or not bytes")
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(self.threads))
        so.inter_op_num_threads = 1
        so.log_severity_level = 4  # the exception below carries the message; keep stderr quiet
        try:
            sess = ort.InferenceSession(bytes(self.onnx), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
            raise ModelError(f"ONNX model cannot be loaded ({_first_line(exc)})") from None
        inputs, outputs = sess.get_inputs(), sess.get_outputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ModelError(f"ONNX model must have one input named {INPUT_NAME!r}, "
                             f"has {[i.name for i in inputs]}")
        inp = inputs[0]
        if inp.type != "tensor(float)":
            raise ModelError(f"ONNX input {INPUT_NAME!r} must be float32, is {inp.type}")
        shape = list(inp.shape)
        if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            raise ModelError(f"ONNX input {INPUT_NAME!r} must be (n, C, H, W) with fixed C, H, W, is {shape}")
        out = [o for o in outputs if o.name == OUTPUT_NAME]
        if not out or len(out[0].shape) != 2:
            raise ModelError(f"ONNX model must have an output {OUTPUT_NAME!r} of shape (n, K), "
                             f"has {[(o.name, o.shape) for o in outputs]}")
        self._session = sess
        self.in_shape_: tuple[int, int, int] = (int(shape[1]), int(shape[2]), int(shape[3]))
        self.n_features_in_ = int(np.prod(self.in_shape_))
        try:
            probe = sess.run([OUTPUT_NAME], {INPUT_NAME: np.zeros((1, *self.in_shape_), np.float32)})[0]
        except Exception as exc:
            raise ModelError(f"ONNX model fails on a {self.in_shape_} input ({_first_line(exc)})") from None
        if probe.ndim != 2 or probe.shape[0] != 1 or probe.shape[1] < 1:
            raise ModelError(f"ONNX model returns logits of shape {probe.shape} for one sample, expected (1, K)")
        self.classes_ = np.arange(probe.shape[1], dtype=np.int64)

    # -- scikit-learn protocol --------------------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        return True

    def fit(self, X, y=None, **kwargs):
        raise NotImplementedError("OnnxClassifier is inference-only: the edge never trains "
                                  "(training happens at the fog; send labelled samples there)")

    def _as_input(self, X) -> np.ndarray:
        x = np.asarray(X, dtype=np.float32)
        if x.ndim == 2:
            if x.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {x.shape[1]} features per row, the model expects "
                                 f"{self.n_features_in_} (= {self.in_shape_})")
            x = x.reshape(len(x), *self.in_shape_)
        elif x.ndim == 4:
            if tuple(x.shape[1:]) != self.in_shape_:
                raise ValueError(f"X has samples of shape {tuple(x.shape[1:])}, the model expects {self.in_shape_}")
        else:
            raise ValueError(f"X must be (n, C, H, W) or (n, C*H*W), got shape {x.shape}")
        return np.ascontiguousarray(x)

    def decision_function(self, X) -> np.ndarray:
        """Raw logits (n, K) as float32."""
        x = self._as_input(X)
        if len(x) == 0:
            return np.empty((0, len(self.classes_)), np.float32)
        parts = [self._session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + _BATCH]})[0]
                 for i in range(0, len(x), _BATCH)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    # -- plumbing ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"OnnxClassifier(in_shape={self.in_shape_}, classes={len(self.classes_)}, "
                f"bytes={len(self.onnx)}, threads={self.threads})")

    def __getstate__(self) -> dict:
        # An InferenceSession cannot be pickled; the bytes are enough to rebuild it.
        return {"onnx": bytes(self.onnx), "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.onnx = state["onnx"]
        self.threads = state["threads"]
        self._build()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else exc.__class__.__name__
    return line if len(line) <= 200 else line[:197] + "..."
