"""Analytic reconstruction from a fully connected first layer, and its batch and CNN extensions
(Qian, Nassar, Hansen, arXiv:2010.15718).

``analytic`` — one sample, exactly. For a first layer ``z = W x + b``, ``∂L/∂W_i = (∂L/∂z_i) x`` and
``∂L/∂b_i = ∂L/∂z_i``, so every row with a non-negligible bias gradient gives ``x = ∇W_i / ∇b_i``.
We average the rows with ``|∇b_i| > rel_tol · max|∇b|`` weighted by ``|∇b_i|``, which is
``Σ sign(∇b_i) ∇W_i / Σ |∇b_i|`` (the best-conditioned rows dominate). The label is the argmin of the
last layer's bias gradient (iDLG's rule for cross-entropy). Works on ``gradient`` captures and on
``delta`` captures of one plain-SGD step (the update is ``-lr·∇``). A batch (B > 1) makes the
ratio a mixture, so the attack then runs ``minimal`` instead and says so in its stats
(``fallback``). A conv-first model raises :class:`AttackError` pointing at ``cnn-analytic``.

``minimal`` — the minimal-structure batch recovery. Labels first (from the last bias gradient:
negative entries are the present classes; counts ``N_c ≈ B·(p̄ − g_c)`` with ``p̄`` the mean
gradient of the absent classes, see :func:`attacks._torchutil.infer_labels`); then gradient
matching over all layers: Adam on the squared L2 distance between dummy and observed gradients,
dummy images start **U[0, 1]** and are kept in [0, 1] (projected after each step), plus the
orthogonality prior ``λ·0.9^⌊it/m⌋·Σ_{i<j}(x_iᵀx_j)²`` (λ = 1, m = 200). Normalisation (ours; the
paper does not fix a scale): the gradient distance is divided by ``‖∇‖²`` of the observation and
the prior uses ``x_iᵀx_j / d`` (d = pixels), so both terms are O(1) whatever the model's gradient
scale. Identifiability needs ``h ≥ B`` (hidden units of the first FC layer ≥ batch size); the
attack checks it and reports ``condition_holds`` (it runs either way).

``cnn-analytic`` — the two-step reconstruction for a conv layer followed by FC layers (the
``convfc`` arch: conv → act → flatten → FC …). Step 1 recovers the FC layer's input, i.e. the conv
layer's activated output, as ``∇W/∇b`` (B = 1) or by the minimal-structure matching restricted
to the FC part (B > 1). Step 2 inverts conv + activation per sample: where the activation is
invertible (leaky_relu everywhere, sigmoid/tanh away from saturation, relu where the output is
> 0) the pre-activation is known and the conv is linear, so the image is the bounded
linear least-squares solution (``scipy.optimize.lsq_linear``, bounds [0, 1]) of
``A x = act⁻¹(a) − b`` (A: the conv as a matrix); for relu the zero outputs only say
``(A x + b) ≤ 0``, so a short projected-Adam refinement of ``‖act(A x + b) − a‖²`` follows. The
condition is ``h ≥ (d/d′)²·C`` (filters vs input/output width and input channels); with relu
roughly half the outputs are zero, so in practice it needs about twice that. The attack reports
``condition_holds`` and the number of usable equations, and runs either way.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import lsq_linear
from torch import nn

from attacks._torchutil import (
    batch_size_of,
    first_param_layer,
    infer_labels,
    leaf_modules,
    linear_layers,
    observed_gradient,
    one_thread,
    served_model,
    to_tensor,
)
from attacks.base import Attack, AttackError, Progress, Reconstruction, register
from protos.capture import Capture

log = logging.getLogger(__name__)

_ACT_TYPES = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU)


# ----------------------------------------------------------------------------------------------
# single-sample ratio
# ----------------------------------------------------------------------------------------------

def ratio_recover(gw: np.ndarray, gb: np.ndarray, rel_tol: float = 1e-3) -> tuple[np.ndarray, dict]:
    """``x = Σ sign(gb_i) gw_i / Σ |gb_i|`` over rows with ``|gb_i| > rel_tol·max|gb|``.

    Returns (x, info) where info has the rows used and the spread of the per-row ratios (relative
    to ‖x‖; ~1e-7 for one sample, large for a mixture)."""
    gw = np.asarray(gw, dtype=np.float64)
    gb = np.asarray(gb, dtype=np.float64)
    amax = float(np.abs(gb).max()) if gb.size else 0.0
    if amax == 0.0:
        raise AttackError("the first layer's bias gradient is zero: nothing to invert (dead layer or zero update)")
    rows = np.flatnonzero(np.abs(gb) > rel_tol * amax)
    x = (np.sign(gb[rows])[:, None] * gw[rows]).sum(0) / np.abs(gb[rows]).sum()
    per_row = gw[rows] / gb[rows, None]
    spread = float(np.linalg.norm(per_row - x, axis=1).max() / max(np.linalg.norm(x), 1e-12))
    return x, {"rows_used": int(rows.size), "rows": int(gb.size), "ratio_spread": spread}


def _first_fc_input_is_image(model: nn.Module) -> tuple[nn.Linear, int]:
    leaves = leaf_modules(model)
    for i, m in enumerate(leaves):
        if isinstance(m, nn.Linear):
            return m, i
        if isinstance(m, nn.Conv2d):
            raise AttackError("the model starts with a conv layer; use the cnn-analytic attack (convfc arch)")
        if not isinstance(m, nn.Flatten):
            raise AttackError(f"unexpected {type(m).__name__} before the first FC layer; analytic needs FC first")
    raise AttackError("the model has no fully connected layer")


# ----------------------------------------------------------------------------------------------
# gradient matching (minimal structure)
# ----------------------------------------------------------------------------------------------

@dataclass
class MatchResult:
    x: torch.Tensor
    loss: float
    grad_loss: float
    iterations: int


def grad_match(*args, **kwargs) -> MatchResult:
    """See :func:`_grad_match`; runs on one thread (the models are tiny)."""
    with one_thread():
        return _grad_match(*args, **kwargs)


def _grad_match(
    model: nn.Module,
    target: list[torch.Tensor],
    labels: torch.Tensor,
    shape: tuple[int, ...],
    *,
    iterations: int = 3000,
    lr: float = 0.05,
    lam: float = 1.0,
    m: int = 200,
    bounds: tuple[float | None, float | None] = (0.0, 1.0),
    init_scale: float = 1.0,
    seed: int = 0,
    tol: float = 1e-12,
    basis: torch.Tensor | None = None,
    prior_until: float = 1.0,
    progress: Progress | None = None,
) -> MatchResult:
    """Gradient matching of a batch of dummy inputs of ``shape`` (B, ...) with fixed labels.

    ``target`` is the observed gradient for ``model.parameters()`` in order. Loss:
    ``Σ‖∇'−∇‖² / Σ‖∇‖² + λ·0.9^⌊it/m⌋·Σ_{i<j}(x_iᵀx_j/d)²``; Adam with step decay (×0.3 at 60 % and
    85 % of the iterations); inputs start U[0, init_scale] and are projected onto ``bounds``."""
    gen = torch.Generator().manual_seed(seed)
    dtype = target[0].dtype
    x0 = torch.rand(shape, generator=gen, dtype=dtype) * init_scale
    if basis is not None:  # optimise coefficients in span(basis) (rows orthonormal), start = projection
        var = (x0.reshape(shape[0], -1) @ basis.T).requires_grad_(True)

        def make_x() -> torch.Tensor:
            return (var @ basis).reshape(shape)
    else:
        var = x0.requires_grad_(True)

        def make_x() -> torch.Tensor:
            return var
    params = list(model.parameters())
    norm = sum(float((t**2).sum()) for t in target) or 1.0
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam([var], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(iterations * 0.6), int(iterations * 0.85)], gamma=0.3)
    b = shape[0]
    d = int(np.prod(shape[1:]))
    iu = torch.triu_indices(b, b, offset=1)
    best = (math.inf, make_x().detach().clone(), math.inf)
    it = 0
    for it in range(1, iterations + 1):
        opt.zero_grad()
        x = make_x()
        out = model(x)
        grads = torch.autograd.grad(loss_fn(out, labels), params, create_graph=True)
        gl = sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True)) / norm
        loss = gl
        if lam > 0 and b > 1 and it <= prior_until * iterations:
            w = lam * 0.9 ** ((it - 1) // m)
            flat = x.reshape(b, -1)
            gram = flat @ flat.T / d
            loss = loss + w * (gram[iu[0], iu[1]] ** 2).sum()
        loss.backward()
        opt.step()
        sched.step()
        if basis is None and (bounds[0] is not None or bounds[1] is not None):
            with torch.no_grad():
                var.clamp_(bounds[0], bounds[1])
        glv = float(gl.detach())
        if glv < best[0]:
            best = (glv, x.detach().clone(), float(loss.detach()))
        if progress is not None and (it % 100 == 0 or it == iterations):
            progress(it, iterations, {"loss": float(loss), "grad_loss": glv})
        if glv < tol:
            break
    return MatchResult(best[1], best[2], best[0], it)


def row_space_fixed_point(
    model: nn.Sequential,
    target: list[torch.Tensor],
    labels: torch.Tensor,
    basis: torch.Tensor,
    shape: tuple[int, ...],
    *,
    starts: int = 200,
    iters: int = 300,
    seed: int = 0,
    tol: float = 1e-12,
) -> MatchResult:
    """Exact batch recovery in the row space of the first dense layer's gradient (h ≥ B).

    With X = A·V (V: the B basis rows of ``basis``, A: B×B unknown) the first layer's gradient is
    ``G₁ = Dᵀ X`` where D (B×h) holds ∂L/∂z₁ of each sample, so ``M := G₁Vᵀ = Dᵀ A``. Given A, the
    network gives D(A·V); given D, A is the least-squares solution of ``Dᵀ A = M``. We iterate this
    (damped by ½) from random U[0,1] starts and keep the A whose full gradient matches best. D has
    rank B only when h ≥ B, which is where the map is solvable; below it the iteration has nothing
    to converge to. Works for any dense-first model (the rest of the network is used as is)."""
    idx = next(i for i, m in enumerate(model) if isinstance(m, nn.Linear))
    first, rest = model[idx], model[idx + 1 :]
    b = shape[0]
    V = basis.to(torch.float64)
    M = target[0].reshape(target[0].shape[0], -1).to(torch.float64) @ V.T  # h × B
    params = list(model.parameters())
    norm = sum(float((t**2).sum()) for t in target) or 1.0
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)

    def dz(A: torch.Tensor) -> torch.Tensor:
        z = (A @ V) @ first.weight.T.to(torch.float64) + first.bias.to(torch.float64)
        z = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(rest(z), labels), z)
        return g  # B × h

    def grad_loss(A: torch.Tensor) -> float:
        x = (A @ V).reshape(shape)
        grads = torch.autograd.grad(loss_fn(model(x), labels), params)
        return float(sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True)) / norm)

    best = (math.inf, None)
    tried = 0
    with one_thread():
        while tried < starts:
            tried += 1
            A = torch.rand((b, V.shape[1]), generator=gen, dtype=torch.float64) @ V.T
            for _ in range(iters):
                D = dz(A)
                sol = torch.linalg.lstsq(D.T, M).solution
                if not torch.isfinite(sol).all():
                    break
                done = float((sol - A).norm()) < 1e-13
                A = 0.5 * A + 0.5 * sol
                if done:
                    break
            gl = grad_loss(A)
            if gl < best[0]:
                best = (gl, A)
            if best[0] < tol:
                break
    A = best[1] if best[1] is not None else torch.zeros((b, b), dtype=torch.float64)
    x = (A @ V).reshape(shape).clamp(0.0, 1.0)
    return MatchResult(x.to(torch.float32), best[0], best[0], tried)


def row_space(gw: np.ndarray, batch: int, rel_tol: float = 1e-7) -> tuple[torch.Tensor | None, int]:
    """Orthonormal basis (r × d) of the row space of the first layer's weight gradient ``Δᵀ X``.

    Every image of the batch lies in it when ``rank(Δ) = B`` (which needs h ≥ B); then the basis
    has exactly B rows and matching only has to find B×B coefficients. Returns (None, rank) when
    the rank is below B (the batch is not identifiable from this layer; match in pixel space)."""
    gw = np.asarray(gw, dtype=np.float64).reshape(gw.shape[0], -1)
    _, s, vt = np.linalg.svd(gw, full_matrices=False)
    rank = int((s > rel_tol * s[0]).sum()) if s.size and s[0] > 0 else 0
    if rank < batch:
        return None, rank
    return torch.from_numpy(np.ascontiguousarray(vt[:batch])), rank


def _labels_for(grad: dict[str, np.ndarray], model: nn.Module, batch: int) -> np.ndarray:
    last = linear_layers(model)[-1]
    if last.bias is None:
        raise AttackError("the last layer has no bias; cannot recover labels analytically")
    return infer_labels(grad[last.bias], batch)


def _target(model: nn.Module, grad: dict[str, np.ndarray], names: list[str] | None = None) -> list[torch.Tensor]:
    names = names or [k for k, _ in model.named_parameters()]
    missing = [k for k in names if k not in grad]
    if missing:
        raise AttackError(f"the update lacks parameters of the architecture (e.g. {missing[0]!r})")
    return [to_tensor(grad[k]) for k in names]


def minimal_reconstruct(capture: Capture, options: dict, progress: Progress | None = None) -> Reconstruction:
    grad = observed_gradient(capture)
    model = served_model(capture, torch.float64)
    batch = batch_size_of(capture)
    first = first_param_layer(model)
    in_shape = tuple(int(v) for v in capture.arch["in_shape"])
    labels = _labels_for(grad, model, batch)
    stats: dict = {"batch": batch, "labels_recovered": labels.tolist()}
    if isinstance(first.module, nn.Linear):
        h = first.module.out_features
        stats.update(hidden_units=h, condition="h >= B", condition_holds=bool(h >= batch))
    else:
        stats.update(condition="first layer is not FC (no h >= B check)", condition_holds=None)
    basis = None
    if isinstance(first.module, nn.Linear) and bool(options.get("subspace", True)):
        basis, rank = row_space(grad[first.weight], batch)
        stats.update(grad_rank=rank, subspace=basis is not None)
    restarts = max(1, int(options.get("restarts", 1)))
    target = _target(model, grad)
    if basis is not None and isinstance(model, nn.Sequential) and bool(options.get("fixed_point", True)):
        fp = row_space_fixed_point(model, target, torch.from_numpy(labels), basis, (batch, *in_shape),
                                   starts=int(options.get("fp_starts", 200)), iters=int(options.get("fp_iters", 300)),
                                   seed=int(options.get("seed", 0)))
        stats.update(fixed_point_starts=fp.iterations, fixed_point_grad_loss=fp.grad_loss)
        if fp.grad_loss < float(options.get("fp_accept", 1e-8)):
            stats.update(method="row-space fixed point", iterations=0, loss=fp.loss, grad_loss=fp.grad_loss)
            return Reconstruction(fp.x.numpy(), labels, stats)
    res, total_it = None, 0
    for r in range(restarts):
        cand = grad_match(
            model, target, torch.from_numpy(labels), (batch, *in_shape),
            iterations=int(options.get("iterations", 2000)), lr=float(options.get("lr", 0.05)),
            lam=float(options.get("lam", 1.0)), m=int(options.get("m", 200)),
            seed=int(options.get("seed", 0)) + 1000 * r, basis=basis,
            prior_until=float(options.get("prior_until", 0.5)), progress=progress,
        )
        total_it += cand.iterations
        if res is None or cand.grad_loss < res.grad_loss:
            res = cand
        if res.grad_loss < 1e-10:
            break
    assert res is not None
    stats.update(iterations=total_it, restarts_run=r + 1, loss=res.loss, grad_loss=res.grad_loss)
    return Reconstruction(res.x.numpy(), labels, stats)


@register
class MinimalStructure(Attack):
    name = "minimal"
    summary = ("minimal-structure batch recovery: labels, then the row-space fixed point (exact when h >= B), "
               "else gradient matching from U[0,1] + orthogonality prior")

    def _reconstruct(self, capture: Capture, progress: Progress | None) -> Reconstruction:
        return minimal_reconstruct(capture, self.options, progress)


@register
class Analytic(Attack):
    name = "analytic"
    summary = "exact single-sample recovery x = dW/db from the first FC layer (batches: minimal-structure)"

    def _reconstruct(self, capture: Capture, progress: Progress | None) -> Reconstruction:
        grad = observed_gradient(capture)
        model = served_model(capture)
        fc, _ = _first_fc_input_is_image(model)
        batch = batch_size_of(capture)
        if batch > 1:
            log.info("analytic: batch of %d, the ratio mixes samples; falling back to minimal-structure", batch)
            rec = minimal_reconstruct(capture, self.options, progress)
            rec.stats["fallback"] = "minimal"
            return rec
        ref = first_param_layer(model)
        if ref.bias is None:
            raise AttackError("the first FC layer has no bias; the ratio attack needs one")
        x, info = ratio_recover(grad[ref.weight], grad[ref.bias], float(self.options.get("rel_tol", 1e-3)))
        in_shape = tuple(int(v) for v in capture.arch["in_shape"])
        labels = _labels_for(grad, model, 1)
        info.update(batch=1, hidden_units=fc.out_features, condition="h >= B", condition_holds=True, iterations=0)
        return Reconstruction(x.reshape(1, *in_shape), labels, info)


# ----------------------------------------------------------------------------------------------
# two-step CNN
# ----------------------------------------------------------------------------------------------

@dataclass
class ConvFC:
    conv: nn.Conv2d
    act: nn.Module | None
    head: nn.Sequential  # from the first FC layer to the output
    head_names: list[str]  # parameter names of head, in the full model's naming


def split_convfc(model: nn.Module) -> ConvFC:
    """conv → [act] → flatten → FC …  (the convfc arch); anything else raises AttackError."""
    if not isinstance(model, nn.Sequential):
        raise AttackError("cnn-analytic needs a sequential conv → act → flatten → FC model (convfc arch)")
    mods = list(model)
    if not mods or not isinstance(mods[0], nn.Conv2d):
        raise AttackError("cnn-analytic needs a conv first layer (convfc arch); for FC-first models use analytic")
    i, act = 1, None
    if i < len(mods) and isinstance(mods[i], _ACT_TYPES):
        act, i = mods[i], i + 1
    if i >= len(mods) or not isinstance(mods[i], nn.Flatten) or i + 1 >= len(mods) or \
            not isinstance(mods[i + 1], nn.Linear):
        raise AttackError("cnn-analytic needs conv → act → flatten → FC (no pooling/second conv; use the convfc arch)")
    head = nn.Sequential(*mods[i + 1:])
    names = [f"{j + i + 1}.{n}" for j, m in enumerate(mods[i + 1:]) for n, _ in m.named_parameters()]
    own = dict(model.named_parameters())
    if any(n not in own for n in names):  # defensive: naming differs from Sequential's indices
        raise AttackError("cannot map the FC head's parameters by name")
    return ConvFC(mods[0], act, head, names)


def _act_inverse(act: nn.Module | None, a: np.ndarray, sat: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Pre-activation and a mask of entries where it is determined."""
    if act is None:
        return a, np.ones_like(a, dtype=bool)
    if isinstance(act, nn.LeakyReLU):
        s = float(act.negative_slope)
        return np.where(a >= 0, a, a / s), np.ones_like(a, dtype=bool)
    if isinstance(act, nn.ReLU):
        return a, a > 1e-9
    if isinstance(act, nn.Sigmoid):
        ok = (a > sat) & (a < 1 - sat)
        ac = np.clip(a, sat, 1 - sat)
        return np.log(ac / (1 - ac)), ok
    if isinstance(act, nn.Tanh):
        ok = np.abs(a) < 1 - sat
        return np.arctanh(np.clip(a, -1 + sat, 1 - sat)), ok
    raise AttackError(f"unsupported activation {type(act).__name__}")


def conv_matrix(conv: nn.Conv2d, in_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, tuple]:
    """The conv (without bias) as a dense matrix (F × D), its bias per output, and the output shape."""
    d = int(np.prod(in_shape))
    eye = torch.eye(d, dtype=torch.float64).reshape(d, *in_shape)
    w = conv.weight.detach().to(torch.float64)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(eye, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    out_shape = tuple(out.shape[1:])
    a_mat = out.reshape(d, -1).T.numpy()
    bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros(out_shape[0])
    b_vec = bias[:, None, None].expand(out_shape).reshape(-1).numpy()
    return a_mat, b_vec, out_shape


def conv_condition(conv: nn.Conv2d, in_shape: tuple[int, int, int], out_shape: tuple) -> dict:
    c, d = in_shape[0], in_shape[-1]
    h, d_out = conv.out_channels, out_shape[-1]
    req = (d / d_out) ** 2 * c
    return {"filters": int(h), "in_width": int(d), "out_width": int(d_out), "in_channels": int(c),
            "required_filters": float(req), "condition": "h >= (d/d')^2 * C", "condition_holds": bool(h >= req)}


def recover_fc_input(capture: Capture, options: dict | None = None,
                     progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Step 1 of cnn-analytic: the first FC layer's input per sample (B, F), labels, stats."""
    options = options or {}
    grad = observed_gradient(capture)
    model = served_model(capture, torch.float64)
    parts = split_convfc(model)
    batch = batch_size_of(capture)
    labels = _labels_for(grad, model, batch)
    fc = parts.head[0]
    wn, bn = parts.head_names[0], parts.head_names[1]
    if batch == 1:
        a, info = ratio_recover(grad[wn], grad[bn], float(options.get("rel_tol", 1e-3)))
        return a[None], labels, {"step1": "ratio", **info}
    lo = 0.0 if isinstance(parts.act, (nn.ReLU, nn.Sigmoid)) else (-1.0 if isinstance(parts.act, nn.Tanh) else None)
    hi = 1.0 if isinstance(parts.act, (nn.Sigmoid, nn.Tanh)) else None
    res = grad_match(
        parts.head, _target(model, grad, parts.head_names), torch.from_numpy(labels), (batch, fc.in_features),
        iterations=int(options.get("iterations", 3000)), lr=float(options.get("lr", 0.05)),
        lam=float(options.get("lam", 1.0)), m=int(options.get("m", 200)), bounds=(lo, hi),
        seed=int(options.get("seed", 0)), progress=progress,
    )
    return res.x.numpy(), labels, {"step1": "minimal", "step1_iterations": res.iterations,
                                   "step1_grad_loss": res.grad_loss, "hidden_units": fc.out_features,
                                   "fc_condition_holds": bool(fc.out_features >= batch)}


def _refine(x: torch.Tensor, f: nn.Module, at: torch.Tensor, bt: torch.Tensor, target: torch.Tensor,
            iters: int, lr: float) -> None:
    """Projected Adam on ‖f(A x + b) − a‖² with x in [0, 1] (in place)."""
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(iters):
        opt.zero_grad()
        loss = ((f(x @ at.T + bt) - target) ** 2).sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)


def invert_conv(conv: nn.Conv2d, act: nn.Module | None, feats: np.ndarray, in_shape: tuple[int, int, int],
                refine_iters: int = 300, lr: float = 0.02) -> tuple[np.ndarray, dict]:
    """Step 2: images (B, C, H, W) from activated conv outputs (B, F)."""
    a_mat, b_vec, _ = conv_matrix(conv, in_shape)
    xs, eqs = [], []
    for a in feats:
        z, ok = _act_inverse(act, a.astype(np.float64))
        eqs.append(int(ok.sum()))
        if ok.sum() == 0:
            x = np.full(a_mat.shape[1], 0.5)
        else:
            sol = lsq_linear(a_mat[ok], z[ok] - b_vec[ok], bounds=(0.0, 1.0),
                             method="bvls" if a_mat.shape[1] <= 1024 else "trf", lsmr_tol="auto")
            x = sol.x
        xs.append(x)
    x0 = np.stack(xs)
    f = act if act is not None else nn.Identity()
    at, bt = torch.from_numpy(a_mat), torch.from_numpy(b_vec)
    need_refine = refine_iters > 0 and (isinstance(act, nn.ReLU) or any(e < a_mat.shape[1] for e in eqs))
    if need_refine:
        target = torch.from_numpy(np.asarray(feats, dtype=np.float64))
        xt = torch.from_numpy(x0.copy()).requires_grad_(True)
        with one_thread():
            _refine(xt, f, at, bt, target, refine_iters, lr)
        x0 = xt.detach().numpy()
    with torch.no_grad():
        pred = f(torch.from_numpy(x0) @ at.T + bt).numpy()
    resid = float(np.linalg.norm(pred - feats) / max(np.linalg.norm(feats), 1e-12))
    info = {"unknowns": int(a_mat.shape[1]), "equations_total": int(a_mat.shape[0]),
            "equations_used_min": int(min(eqs)), "step2_refined": bool(need_refine), "step2_rel_residual": resid}
    if a_mat.shape[1] <= 4096:
        info["conv_rank"] = int(np.linalg.matrix_rank(a_mat))
    return x0.reshape(len(feats), *in_shape), info


@register
class CnnAnalytic(Attack):
    name = "cnn-analytic"
    summary = "two-step CNN recovery: FC input analytically (or minimal for B>1), then invert the conv layer"

    def _reconstruct(self, capture: Capture, progress: Progress | None) -> Reconstruction:
        model = served_model(capture, torch.float64)
        parts = split_convfc(model)
        in_shape = tuple(int(v) for v in capture.arch["in_shape"])
        feats, labels, stats = recover_fc_input(capture, self.options, progress)
        x, info = invert_conv(parts.conv, parts.act, feats, in_shape,
                              refine_iters=int(self.options.get("refine_iters", 300)))
        with torch.no_grad():
            out_shape = parts.conv(torch.zeros((1, *in_shape), dtype=torch.float64)).shape[1:]
        stats.update(conv_condition(parts.conv, in_shape, tuple(out_shape)))
        stats.update(info)
        stats["batch"] = len(feats)
        stats.setdefault("iterations", stats.get("step1_iterations", 0))
        if not stats["condition_holds"]:
            stats["note"] = "condition h >= (d/d')^2*C unmet: the conv inversion is underdetermined"
        return Reconstruction(x, labels, stats)

