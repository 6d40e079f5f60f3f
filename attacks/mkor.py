"""MKOR — a malicious cloud's parameters and the reconstruction they enable (after Wang,
Velipasalar, Gursoy, WACV 2024, arXiv:2310.19222), adapted to a victim that trains with softmax
cross-entropy.

The malicious cloud controls only what it serves: the parameters (same architecture, same names
and shapes) and the round config (it may ask its target for one gradient, :func:`round_config`).
The victim's loss is the fog's own (mean softmax cross-entropy, ``fog/trainer.py``).

**Why the published recipe mixes samples here.** Published MKOR serves ``W₁ = (1/d)·1``, ``b₁ = 0``
and identity later layers, so logit ``c`` depends only on hidden unit ``c`` and, with a loss on raw
outputs, only the true-class path of a sample gets gradient. With softmax cross-entropy
``∂L/∂z_c = (p_c − 1[y=c]) / B`` for *every* sample: each class path carries its own sample with
weight ``p_c − 1`` plus every other sample with weight ``p_c``. With all rows equal, all logits are
equal, so ``p = softmax(b_last) =: π`` for every sample, and the path gradients are
``B·∇W₁[c] = π_c·S − X_c`` (``S`` the batch sum, ``X_c`` the class-c sample): a linear map with a
one-dimensional null space (``X_c → X_c + π_c·u``). It is solvable exactly when at least one class
is *absent* (then ``X_a = 0`` gives ``S = B·∇W₁[a] / π_a``), which a batch of 10 distinct digits
never allows.

**What we serve instead (same powers).** The first FC layer keeps MKOR's rows ``(1/d)·1`` (the mean
of its input, ``m(x)``) but each class ``c`` gets ``T = hidden // K`` units with biases ``−τ_t``
(thresholds on ``m``: ``τ₀ = −1`` below every input, the others quantiles of ``m`` over data the cloud
holds, e.g. its warm-start or test split, passed as ``aux_x``); later FC layers sum class ``c``'s
units into logit ``c`` (identity-like, biases 0). Every logit then gets the same value, so ``p = π``
(uniform) exactly, whatever the input. A ReLU unit with threshold ``τ_t`` passes the samples with
``m > τ_t``, so differences of consecutive thresholds isolate the samples in a brightness *bin*
(the binning idea of Fowl et al.'s "Robbing the Fed"), and inside each bin the per-class system
above is exactly solvable as long as some class is missing from the bin — which holds for every bin
with fewer than K samples. Present classes have a negative bin bias gradient (``π_c·n − N_c < 0``),
absent ones a positive one; that sign is the label. Each sample whose class is unique within its
bin is recovered exactly (the ratio ``X_c / w_c``); same-class samples sharing a bin come out
averaged. Leaky ReLU works the same (its slope cancels in the differences); sigmoid/tanh get one
group (no gating), i.e. exact only when a class is absent from the batch.

**Conv layers.** ``cnn`` (conv→act→pool ×2 →FC→FC): bias 0, conv 1 has four shifted delta
("copy") filters per input channel (offsets (0,0), (0,1), (1,0), (1,1)), conv 2 four shifted copies
of each; after the two 2×2 max-pools the 16·C maps hold, at every pixel, the max of the input over
the 4×4 window starting there (max-pooling keeps no more than that). The attack recovers those
features exactly through the FC layers as above and returns the largest image consistent with
them, the morphological closing ``x̂[p] = min over windows ∋ p of D`` (exact where strokes are at
least 4 px wide, an over-estimate in gaps). ``convfc`` (conv→act→FC, no pooling): ``stride²``
shifted copies per input channel give the input pixels themselves, so recovery is exact. The
inconspicuous variant adds Gaussian noise (std ``noise_std``) to every served parameter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attacks._torchutil import batch_size_of, linear_layers, observed_gradient, served_model
from attacks.base import Attack, AttackError, Progress, Reconstruction, register
from kernel.models import build_model, get_params, set_params
from protos.capture import Capture
from protos.control import TrainConfig

log = logging.getLogger(__name__)

TAU_LOW = -1.0  # below every input statistic: the first unit of each class sees every sample


def round_config(base: TrainConfig | None = None) -> TrainConfig:
    """The round config the malicious cloud sends its target: one full-batch gradient (FedSGD)."""
    base = base or TrainConfig()
    return base.model_copy(update={"update_kind": "gradient", "local_epochs": 1, "max_steps": 1, "shuffle": False})


# ----------------------------------------------------------------------------------------------
# structure of the supported architectures
# ----------------------------------------------------------------------------------------------

@dataclass
class _Parts:
    convs: list[nn.Conv2d]
    pooled: bool
    fcs: list[nn.Linear]
    act: nn.Module | None
    slope: float  # ReLU 0, LeakyReLU its slope; None-like (nan) for smooth activations


def _parts(model: nn.Module, arch: str) -> _Parts:
    mods = [m for m in model.modules() if not list(m.children())]
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    fcs = [m for m in mods if isinstance(m, nn.Linear)]
    acts = [m for m in mods if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh))]
    act = acts[0] if acts else None
    if isinstance(act, nn.ReLU):
        slope = 0.0
    elif isinstance(act, nn.LeakyReLU):
        slope = float(act.negative_slope)
    else:
        slope = float("nan")
    pooled = any(isinstance(m, nn.MaxPool2d) for m in mods)
    if arch not in ("mlp", "cnn", "convfc"):
        raise AttackError(f"MKOR supports the mlp, cnn and convfc archs, not {arch!r}")
    if convs and not (slope == slope):  # smooth activation with conv copies
        raise AttackError("MKOR's conv copy filters need a relu or leaky_relu model")
    return _Parts(convs, pooled, fcs, act, slope)


def _groups(hidden: int, k: int, slope: float) -> int:
    if hidden < k:
        raise AttackError(f"MKOR needs at least one first-layer unit per class (hidden {hidden} < {k} classes)")
    return hidden // k if slope == slope else 1  # smooth activations: no gating, one group


def _copy_conv(conv: nn.Conv2d, in_ch: int, shifts: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Set delta filters: out channel j·len(shifts)+s copies input channel j shifted by shifts[s].
    Returns [(out_channel, in_channel, shift_index)]."""
    k = conv.kernel_size[0]
    need = in_ch * len(shifts)
    if need > conv.out_channels:
        raise AttackError(f"MKOR copy filters need {need} conv channels, the model has {conv.out_channels}")
    w = torch.zeros_like(conv.weight)
    layout = []
    for j in range(in_ch):
        for s, (a, b) in enumerate(shifts):
            o = j * len(shifts) + s
            w[o, j, k // 2 + a, k // 2 + b] = 1.0
            layout.append((o, j, s))
    with torch.no_grad():
        conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.zero_()
    return layout


def _features(model: nn.Module, parts: _Parts, x: np.ndarray) -> np.ndarray:
    """Input of the first FC layer for images x (N, C, H, W)."""
    fc1 = parts.fcs[0]
    out: list[torch.Tensor] = []
    h = fc1.register_forward_hook(lambda _m, inp, _o: out.append(inp[0].detach()))
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    finally:
        h.remove()
    return out[0].reshape(len(x), -1).numpy().astype(np.float64)


def _cnn_shifts() -> list[tuple[int, int]]:
    return [(0, 0), (0, 1), (1, 0), (1, 1)]


def _convfc_shifts(conv: nn.Conv2d) -> list[tuple[int, int]]:
    s = conv.stride[0]
    if s - 1 > conv.kernel_size[0] // 2:
        raise AttackError(f"convfc stride {s} too large for kernel {conv.kernel_size[0]} to copy every pixel")
    return [(a, b) for a in range(s) for b in range(s)]


def malicious_params(
    spec: dict,
    honest_params: dict[str, np.ndarray],
    rng: np.random.Generator,
    inconspicuous: bool = False,
    aux_x: np.ndarray | None = None,
    noise_std: float = 1e-3,
) -> dict[str, np.ndarray]:
    """The parameters a malicious cloud serves its target: same names and shapes as
    ``honest_params``. ``aux_x`` (images the cloud holds) sets the brightness-bin thresholds; without
    it they are spread evenly over [0, 0.5]."""
    model = build_model(spec)
    set_params(model, honest_params)
    parts = _parts(model, spec["arch"])
    c_in = int(spec["in_shape"][0])
    with torch.no_grad():
        if spec["arch"] == "cnn":
            if len(parts.convs) != 2:
                raise AttackError("expected two conv layers in the cnn arch")
            _copy_conv(parts.convs[0], c_in, _cnn_shifts())
            for p in parts.convs[1].parameters():
                p.zero_()
            # conv 2: four shifted copies of each of conv 1's copy channels
            _copy_conv(parts.convs[1], 4 * c_in, _cnn_shifts())
        elif spec["arch"] == "convfc":
            _copy_conv(parts.convs[0], c_in, _convfc_shifts(parts.convs[0]))
        fcs = parts.fcs
        k = fcs[-1].out_features
        t_groups = _groups(fcs[0].out_features, k, parts.slope)
        # first FC: rows (1/d_used) on the features that carry data, thresholds as biases
        for m in fcs:
            m.weight.zero_()
            m.bias.zero_()
        probe = np.zeros((1, *spec["in_shape"]), dtype=np.float32)
        used = np.ones(fcs[0].in_features, dtype=bool)
        if parts.convs:  # features that can be non-zero: those of the copy channels
            probe_feats = _features(model, parts, np.ones_like(probe))
            used = probe_feats[0] != 0
        w_row = np.where(used, 1.0 / max(int(used.sum()), 1), 0.0)
        if t_groups > 1:
            if aux_x is not None and len(aux_x):
                m_aux = _features(model, parts, aux_x) @ w_row
                qs = np.quantile(m_aux, np.linspace(0, 1, t_groups + 1)[1:-1])
            else:
                qs = np.linspace(0.0, 0.5, t_groups + 1)[1:-1]
            taus = np.concatenate([[TAU_LOW], np.sort(qs)])
        else:
            taus = np.array([TAU_LOW if parts.slope == parts.slope else 0.0])
        fc1 = fcs[0]
        for c in range(k):
            for t in range(t_groups):
                u = c * t_groups + t
                fc1.weight[u] = torch.from_numpy(w_row).float()
                fc1.bias[u] = -float(taus[t])
        # later layers: class c's units summed into unit c, identity afterwards
        for li, m in enumerate(fcs[1:], start=1):
            if li == 1:
                for c in range(k):
                    m.weight[c, c * t_groups:(c + 1) * t_groups] = 1.0
            else:
                for c in range(k):
                    m.weight[c, c] = 1.0
            if m.out_features < k:
                raise AttackError(f"MKOR needs hidden layers of at least {k} units")
    params = get_params(model)
    if inconspicuous:
        params = {n: (v + rng.normal(0.0, noise_std, v.shape)).astype(np.float32) for n, v in params.items()}
    return params


# ----------------------------------------------------------------------------------------------
# recovery
# ----------------------------------------------------------------------------------------------

def _class_units(model: nn.Module, parts: _Parts, k: int) -> dict[int, np.ndarray]:
    """First-layer units feeding each class (from the served weights), sorted by threshold."""
    fcs = parts.fcs
    path = np.eye(k)
    for m in reversed(fcs[1:]):
        path = path @ np.abs(m.weight.detach().double().numpy())
    tau = -fcs[0].bias.detach().double().numpy()
    out: dict[int, np.ndarray] = {}
    cls = np.argmax(path, axis=0)
    strong = path.max(axis=0) > 0.5
    for c in range(k):
        units = np.flatnonzero(strong & (cls == c))
        out[c] = units[np.argsort(tau[units])]
    sizes = {len(v) for v in out.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise AttackError("the served parameters do not have MKOR's per-class paths (was the model served by mkor?)")
    return out


def recover_features(
    gw: np.ndarray, gb: np.ndarray, units: dict[int, np.ndarray], slope: float, batch: int,
    rel_tol: float = 1e-6,
) -> tuple[list[np.ndarray], list[int], dict]:
    """Per bin, solve the class system; returns (features, labels, stats)."""
    k = len(units)
    t_groups = len(units[0])
    g = np.stack([gw[units[c]] for c in range(k)])  # (K, T, F)
    b = np.stack([gb[units[c]] for c in range(k)])  # (K, T)
    gated = slope == slope  # relu/leaky: every sample above tau_0 weighs exactly 1/B in every bin sum
    bins_g, bins_b = [], []
    if gated and t_groups > 1:
        for t in range(t_groups):
            if t < t_groups - 1:
                bins_g.append((g[:, t] - g[:, t + 1]) / (1 - slope))
                bins_b.append((b[:, t] - b[:, t + 1]) / (1 - slope))
            else:
                bins_g.append((g[:, t] - slope * g[:, 0]) / (1 - slope))
                bins_b.append((b[:, t] - slope * b[:, 0]) / (1 - slope))
    else:
        bins_g, bins_b = [g[:, 0]], [b[:, 0]]
    pi = np.full(k, 1.0 / k)
    scale = max(float(np.abs(b).max()), 1e-30)
    g_scale = max(float(np.abs(g).max()), 1e-30)
    feats: list[np.ndarray] = []
    labels: list[int] = []
    counts: list[float] = []
    unresolved = empty = mixtures = 0
    for dg, db in zip(bins_g, bins_b, strict=True):
        r = db / pi
        w_tot = float(r.max())  # weight of the whole bin, read off an absent class
        w = pi * w_tot - db  # per-class weight in this bin (0 for absent classes)
        if gated:  # relu/leaky: every sample weighs exactly 1/B, so round to whole samples
            if w_tot * batch < 0.5:
                # no absent class gives weight: either empty, or one sample of *every* class (singular)
                if float(np.abs(dg).max()) > 1e-6 * g_scale:
                    unresolved += 1
                else:
                    empty += 1
                continue
            absent = w * batch < 0.5
        else:
            if w_tot <= rel_tol * scale * k:
                empty += 1
                continue
            absent = w <= 1e-3 * w_tot * pi.min()
        present = ~absent
        if not absent.any():
            unresolved += 1
            continue
        s_sum = dg[absent].sum(0) / pi[absent].sum()
        for c in np.flatnonzero(present):
            xc = pi[c] * s_sum - dg[c]
            feats.append(xc / w[c])
            labels.append(int(c))
            n_c = float(w[c] * batch)  # samples of class c in the bin (integer for relu/leaky)
            counts.append(n_c)
            if gated and n_c > 1.5:
                mixtures += 1
    stats = {"groups_per_class": t_groups, "bins": len(bins_g), "bins_empty": empty,
             "bins_unresolved": unresolved, "recovered": len(feats), "mixtures": mixtures,
             "estimated_counts": [round(c, 3) for c in counts]}
    return feats, labels, stats


def _closing_from_max(dmap: np.ndarray, win: int) -> np.ndarray:
    """Largest image whose win×win forward max filter is ``dmap`` (C, H, W): min over the windows
    covering each pixel."""
    c, h, w = dmap.shape
    out = np.full_like(dmap, np.inf)
    for dy in range(win):
        for dx in range(win):
            # pixel (p, q) lies in the window starting at (p-dy, q-dx)
            src = np.full_like(dmap, np.inf)
            src[:, dy:, dx:] = dmap[:, : h - dy, : w - dx]
            out = np.minimum(out, src)
    return np.where(np.isfinite(out), out, 0.0)


def features_to_images(spec: dict, feats: np.ndarray) -> np.ndarray:
    """Map recovered FC-input features back to images (N, C, H, W) for MKOR's served layout."""
    c, h, w = (int(v) for v in spec["in_shape"])
    n = len(feats)
    if spec["arch"] == "mlp":
        return feats.reshape(n, c, h, w)
    model = build_model(spec)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if spec["arch"] == "convfc":
        conv = convs[0]
        shifts = _convfc_shifts(conv)
        s = conv.stride[0]
        ho = (h + 2 * (conv.kernel_size[0] // 2) - conv.kernel_size[0]) // s + 1
        wo = (w + 2 * (conv.kernel_size[0] // 2) - conv.kernel_size[0]) // s + 1
        f = feats.reshape(n, conv.out_channels, ho, wo)
        x = np.zeros((n, c, h, w))
        for j in range(c):
            for si, (a, b) in enumerate(shifts):
                o = j * len(shifts) + si
                ys = np.arange(ho) * s + a
                xs = np.arange(wo) * s + b
                ok_y, ok_x = ys < h, xs < w
                x[:, j, ys[ok_y][:, None], xs[ok_x][None, :]] = f[:, o][:, ok_y][:, :, ok_x]
        return x
    # cnn: 16 maps per input channel, offsets o = (2a'+a, 2b'+b), each at stride 4
    ch2 = convs[1].out_channels
    h4, w4 = h // 4, w // 4
    f = feats.reshape(n, ch2, h4, w4)
    shifts = _cnn_shifts()
    out = np.zeros((n, c, h, w))
    for i in range(n):
        dmap = np.zeros((c, h4 * 4, w4 * 4))
        for j in range(c):
            for s1, (a, b) in enumerate(shifts):
                mid = j * 4 + s1
                for s2, (a2, b2) in enumerate(shifts):
                    o = mid * 4 + s2
                    dmap[j, 2 * a2 + a::4, 2 * b2 + b::4] = f[i, o]
        out[i, :, : h4 * 4, : w4 * 4] = _closing_from_max(dmap, 4)
    return out


@register
class Mkor(Attack):
    name = "mkor"
    summary = "MKOR: recover each sample from its class path's gradient ratio on maliciously served parameters"

    def _reconstruct(self, capture: Capture, progress: Progress | None) -> Reconstruction:
        spec = capture.arch
        grad = observed_gradient(capture)
        model = served_model(capture)
        parts = _parts(model, spec.get("arch", ""))
        k = parts.fcs[-1].out_features
        units = _class_units(model, parts, k)
        refs = linear_layers(model)
        fc1 = refs[0]
        batch = batch_size_of(capture)
        feats, labels, stats = recover_features(grad[fc1.weight], grad[fc1.bias], units, parts.slope, batch,
                                                float(self.options.get("rel_tol", 1e-6)))
        if not feats:
            c, h, w = spec["in_shape"]
            return Reconstruction(np.zeros((0, c, h, w), np.float32), np.zeros(0, np.int64),
                                  {**stats, "batch": batch, "iterations": 0})
        x = features_to_images(spec, np.stack(feats))
        stats.update(batch=batch, iterations=0, recovered_fraction=len(feats) / max(batch, 1))
        if progress is not None:
            progress(1, 1, {"recovered": len(feats)})
        return Reconstruction(x, np.array(labels), stats)
