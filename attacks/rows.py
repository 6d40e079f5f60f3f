"""Row-wise analytic leakage ("neuron isolation") from the first fully connected layer.

For a first layer z = W x + b, every sample n adds δ_ni·x_n to ∂L/∂W_i and δ_ni to ∂L/∂b_i. When a
unit i is driven by a single sample of the batch (a ReLU unit active for one sample only, say),
the row ratio ∂L/∂W_i / ∂L/∂b_i is exactly that sample, however large the batch. The ratio is
unchanged by scaling, so it holds for a multi-step ``delta`` update too, as long as the same one
sample drives the unit in every local step (then ΔW_i = Σ_t c_t x_n and Δb_i = Σ_t c_t).

This is the attack a curious cloud can run on any update of a dense-first model at no cost: it
returns one candidate per usable row (outside the image range: discarded; near-duplicates:
merged) with the label the served model predicts for it. Candidates that are mixtures of several
samples score low against every ground-truth image, so scoring (optimal assignment) counts only
the isolated ones as recovered.
"""

from __future__ import annotations

import numpy as np
import torch

from attacks.base import Attack, AttackError, Progress, Reconstruction, register
from kernel.models import build_model, set_params
from protos.capture import Capture


def first_dense_pair(capture: Capture) -> tuple[str, str]:
    names = list(capture.update)
    for i, name in enumerate(names):
        arr = capture.update[name]
        if arr.ndim == 4:
            raise AttackError("the model starts with a conv layer; row-wise recovery needs a dense first layer")
        if arr.ndim == 2:
            bias = names[i + 1] if i + 1 < len(names) else None
            if bias is None or capture.update[bias].shape != (arr.shape[0],):
                raise AttackError("the first dense layer has no bias; the ratio needs one")
            return name, bias
    raise AttackError("the capture has no dense layer")


def _output_after(capture: Capture, wname: str) -> np.ndarray | None:
    """The update of the layer right after the first one, if it is the output layer (K x h)."""
    names = list(capture.update)
    i = names.index(wname)
    rest = [n for n in names[i + 2 :] if capture.update[n].ndim == 2]
    if len(rest) != 1:
        return None
    w2 = capture.update[rest[0]]
    if w2.shape != (int(capture.arch["num_classes"]), capture.update[wname].shape[0]):
        return None
    return w2.astype(np.float64)


@register
class RowAnalytic(Attack):
    name = "analytic-rows"
    summary = "per-row dW/db of the first dense layer: exact for every sample a unit isolates (any batch, delta too)"

    def _reconstruct(self, capture: Capture, progress: Progress | None) -> Reconstruction:
        wname, bname = first_dense_pair(capture)
        gw = capture.update[wname].astype(np.float64)
        gb = capture.update[bname].astype(np.float64)
        in_shape = tuple(int(v) for v in capture.arch["in_shape"])
        if gw.shape[1] != int(np.prod(in_shape)):
            raise AttackError(f"first dense layer takes {gw.shape[1]} inputs, the images have {int(np.prod(in_shape))}")
        rel_tol = float(self.options.get("rel_tol", 1e-6))
        range_tol = float(self.options.get("range_tol", 0.02))
        dedup_mse = float(self.options.get("dedup_mse", 1e-6))
        amax = float(np.abs(gb).max()) if gb.size else 0.0
        if amax == 0.0:
            raise AttackError("the first layer's bias update is zero: nothing to invert")
        rows = np.flatnonzero(np.abs(gb) > rel_tol * amax)
        rows = rows[np.argsort(-np.abs(gb[rows]))]
        cands = gw[rows] / gb[rows, None]
        in_range = (cands.min(1) >= -range_tol) & (cands.max(1) <= 1 + range_tol)
        kept: list[np.ndarray] = []
        for c in cands[in_range]:
            if all(np.mean((c - k) ** 2) > dedup_mse for k in kept):
                kept.append(np.clip(c, 0.0, 1.0))
        stats = {"rows": int(gb.size), "rows_used": int(rows.size), "in_range": int(in_range.sum()),
                 "candidates": len(kept), "batch": capture.num_samples, "update_kind": capture.kind}
        if not kept:
            return Reconstruction(np.zeros((0, *in_shape), np.float32), np.zeros(0, np.int64), stats)
        x = np.stack(kept).reshape(-1, *in_shape).astype(np.float32)
        labels = self._labels_from_next_layer(capture, wname, gw, gb, kept, cands, rows, in_range)
        if labels is not None:
            stats["labels_from"] = "sign of the output layer's column for the isolating unit"
            return Reconstruction(x, labels, stats)
        stats["labels_from"] = "the served model's prediction"
        model = build_model(capture.arch)
        set_params(model, capture.served)
        with torch.no_grad():
            y = model.eval()(torch.from_numpy(x)).argmax(1).numpy()
        return Reconstruction(x, y, stats)

    @staticmethod
    def _labels_from_next_layer(capture, wname, gw, gb, kept, cands, rows, in_range) -> np.ndarray | None:
        """For a unit driven by one sample n, the output layer's column i is δ_n·h_ni, with
        δ_n = p_n − onehot(y_n): negative only at the true class. A delta of plain or momentum SGD
        is a negative multiple of summed gradients, so the sign flips; Adam's per-coordinate
        scaling breaks the structure (then: None, and the caller predicts instead)."""
        w2 = _output_after(capture, wname)
        if w2 is None or capture.hparams.optimizer == "adam":
            return None
        sign = -1.0 if capture.kind == "gradient" else 1.0
        usable = rows[in_range]
        out = []
        for k in kept:
            # the row whose candidate this is (first match; duplicates share the sample)
            j = next(r for r, c in zip(usable, cands[in_range], strict=True) if np.allclose(np.clip(c, 0, 1), k))
            col = w2[:, j] * sign
            out.append(int(np.argmax(col)))
        return np.asarray(out, dtype=np.int64)
