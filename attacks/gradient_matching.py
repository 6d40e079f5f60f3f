"""Gradient-matching reconstruction: DLG, iDLG, Inverting Gradients and Wasserstein DLG.

Every attack optimises dummy samples so that the update the fog *would* have sent for them
(:mod:`attacks.simulate`, a differentiable re-run of the fog's local training from the captured
hyper-parameters) matches the captured update. ``gradient`` captures are matched directly; a
one-step plain-SGD ``delta`` is turned into its gradient (``-delta/lr``); longer ``delta`` updates
are matched by simulating every local step (see :mod:`attacks.simulate` for the batch-order
rules and ``assume_full_batch``). Attacks never read ground truth.

``dlg`` (Zhu et al. 2019)
    Dummy image and dummy soft label (logits) from N(0, 1), loss ``sum_l ||g'_l - g_l||^2``,
    L-BFGS. ``iterations`` counts L-BFGS *outer* steps as in the DLG reference code (300 calls
    of ``optimizer.step``, each up to ``inner`` = 20 L-BFGS iterations); ``stats["evaluations"]``
    counts gradient evaluations, the honest unit of work. The label is the argmax of the soft
    label.

``idlg`` (Zhao et al. 2020)
    The label is read off the last layer first (below), then only the image is optimised, as
    in DLG.

``ig`` (Geiping et al. 2020)
    Loss ``1 - cos(g', g)`` with all layers concatenated into one vector, plus ``tv`` times the
    total variation (mean absolute difference of horizontal and vertical neighbours). Adam, lr
    0.1, on the *sign* of the gradient; the lr drops 10x at 3/8, 5/8 and 7/8 of ``iterations``;
    the image is clamped to [0, 1] after each step; ``restarts`` random starts (U[0, 1]), the
    one with the lowest final loss is kept. Cosine is scale-free, so it is unaffected by the
    ``1/lr`` rescaling, by clipping, and by the learning-rate/step count of a delta. ``tv``
    defaults to 0: on clean 8x8 digit captures every TV weight we tried (1e-6 to 1e-4, Geiping
    used 1e-4 on ImageNet) lowered the PSNR (3-step SGD delta, batch 4, 3 seeds: 76-91 dB at 0,
    51-72 at 1e-6, 33-52 at 1e-5); raise it for noisy updates or larger natural images.

``wdlg`` (Wang, Peng, He, Tan 2023)
    The label comes from the last layer (as iDLG), then DLG's L-BFGS with a Wasserstein-based
    distance in place of the squared L2 distance. A Wasserstein distance between the *value
    sets* of two gradients ignores which coordinate a value sits at (any permutation of a
    gradient is at distance 0), so it cannot alone pin down an image. Two formulations that
    keep the coordinate structure are offered:

    ``distance="sliced"`` (default): per *row* of each gradient tensor (one output unit: a conv
    filter's ``in*kh*kw`` weights, a dense unit's incoming weights, a bias vector), the squared
    1-D Wasserstein-2 distance between the empirical distributions of the dummy and real
    values (exact in 1-D: sort both rows and take the squared L2 distance of the sorted
    vectors), plus ``align`` (default 1) times the squared L2 distance of the rows. The W2 term
    compares the distributions of values row by row (a conv filter's weight-gradient histogram,
    say); the alignment term ties every value to its coordinate, so the total is zero iff the
    gradients are equal coordinate by coordinate. Sorting is differentiable almost everywhere.

    ``distance="kr"``: a pure Wasserstein distance *over the coordinates*. Each row is a signed
    measure on the line of its coordinates ``0, 1, ..., n-1`` and the distance is the
    Kantorovich-Rubinstein norm of the difference between dummy and real rows, which on a line
    has the closed form ``sum_i |C_i|`` with ``C_i = sum_{j<=i} (g'_j - g_j)`` (the L1 norm of
    the difference of the cumulative distributions; any imbalance of total mass is carried to
    an absorbing point after the last coordinate, the ``i = n-1`` term). Moving a value from
    coordinate j to k costs ``|j - k|`` times the value, so the coordinates are the ground
    space itself; zero iff equal. Each row's distance is divided by the real row's mass
    ``sum_i |g_i|`` so that big layers do not drown small ones (in a small batch-1 trial the
    median L-BFGS iterations to 30 dB fell from 573 to 337). Exact, no inner iterative
    solver, differentiable almost everywhere; but L1-like, hence not smooth at the optimum.

    Both run with ``line_search="strong_wolfe"`` by default: without one, L-BFGS stalls on the
    L1-like ``kr`` (1 of 20 batch-1 runs reached 30 dB in a trial). Why ``sliced`` is the
    default (docs/attacks-gm.md, section B, 20 seeds): on digits with the DLG LeNet it reached
    30 dB in 90 % of batch-4 runs against 75 % for DLG and iDLG, with a lower median final MSE,
    and matched them at batch 1; ``kr`` reconstructs to float precision at batch 1 when it
    converges, but needs 10x more iterations than L2 there, and rarely gets to 30 dB at batch
    4 within 1500 iterations.

Label inference (``idlg``, ``ig``, ``wdlg``)
    If the update header carries per-class ``label_counts`` for exactly the batch, they are used
    (the fog sent them; ``label_source = "header"``). Otherwise, for one sample, the iDLG rule:
    the class whose row of the last-layer weight gradient sums to the most negative value (with
    non-negative features, only the true class's row is negative). For a batch of B, the
    last-layer *bias* gradient ``g_b = mean_i(p_i) - counts / B`` is used (``p_i`` the softmax of
    sample i): every class with ``g_b < 0`` is present (the B most negative if more), and the
    remaining slots go one by one to the class with the largest ``B * (p_hat - g_b[c]) -
    assigned[c]``, where ``p_hat``, the estimate of the batch's mean softmax, is the served
    model's mean softmax over 64 random U[0, 1] inputs (the attacker has the model; at the
    initialisations used here the prediction depends little on the input, so this is close; in
    a trial on digits it got the multiset right in 59 of 60 LeNet batches of 4 and 8, and in all
    of 120 CNN and 180 MLP ones). For a multi-step delta, ``-delta_b / (lr * S)`` stands in for
    ``g_b`` with ``S`` the momentum-weighted step count (the model drifts during the steps, so
    this is approximate); for Adam only its sign pattern is meaningful, so counts beyond
    presence are a guess. When the local steps used several distinct mini-batches, which labels
    trained together is unknown: :func:`label_orders` lists the distinct ways to deal the
    multiset into the batches (at most ``label_trials``), each gets a short screening run
    (a tenth of the iterations), and the lowest loss wins.

Options (keyword arguments; unknown ones raise :class:`AttackError`). All attacks:
``iterations``, ``restarts``, ``seed``, ``lr``, ``progress_every``, ``assume_full_batch``,
``double`` (compute in float64; default on, cheap on these models; float32 gave the same iDLG
success on digits), ``threads`` (torch threads while running, restored afterwards). L-BFGS
attacks (``dlg``, ``idlg``, ``wdlg``): ``inner`` (L-BFGS iterations per outer step),
``line_search`` (``None`` or ``"strong_wolfe"``). Attacks with inferred labels (``idlg``,
``wdlg``, ``ig``): ``use_header_labels``, ``label_trials``. ``wdlg``: ``distance``
(``"sliced"`` or ``"kr"``), ``align``. ``ig``: ``tv``, ``init`` (``"uniform"`` or
``"gaussian"``).

The ``progress`` callback gets ``(done, total, {"loss": float, "x": current estimate, ...})``
every ``progress_every`` outer iterations (L-BFGS attacks add ``"evaluations"``); benchmarks use
the estimate to time convergence.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attacks.base import Attack, AttackError, Progress, Reconstruction, register
from attacks.simulate import (
    SimSpec,
    Victim,
    dummy_batch_size,
    momentum_scale,
    schedule,
    simulate,
    target_update,
)
from protos.capture import Capture

log = logging.getLogger(__name__)

Distance = Callable[[list[Tensor], list[Tensor]], Tensor]


# ---------------------------------------------------------------------------------------------
# distances


def l2_distance(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """DLG: sum over layers of the squared Euclidean distance."""
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def cosine_distance(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Inverting Gradients: 1 - cosine similarity of all layers concatenated."""
    dot = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    na = sum((x * x).sum() for x in a)
    nb = sum((y * y).sum() for y in b)
    return 1 - dot / (torch.sqrt(na) * torch.sqrt(nb) + 1e-30)  # type: ignore[operator]


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def kr_distance(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """WDLG (``distance="kr"``): per tensor row, the 1-D Wasserstein-1 (Kantorovich-Rubinstein) norm of the
    signed difference measure on the row's coordinates, ``sum_i |cumsum(g' - g)_i|``, divided by
    the real row's mass ``sum_i |g_i|`` so that no layer dominates by sheer size."""
    total = None
    for x, y in zip(a, b, strict=True):
        w = torch.cumsum(_rows(x - y), dim=1).abs().sum(dim=1)
        w = (w / (_rows(y).abs().sum(dim=1) + 1e-12)).sum()
        total = w if total is None else total + w
    assert total is not None
    return total


def sliced_distance(a: list[Tensor], b: list[Tensor], align: float = 1.0) -> Tensor:
    """WDLG (default): per tensor row, squared 1-D W2 between the sorted values, plus
    ``align`` times the squared L2 distance (the coordinate alignment)."""
    total = None
    for x, y in zip(a, b, strict=True):
        xs, _ = torch.sort(_rows(x), dim=1)
        ys, _ = torch.sort(_rows(y), dim=1)
        w = ((xs - ys) ** 2).sum() + align * ((x - y) ** 2).sum()
        total = w if total is None else total + w
    assert total is not None
    return total


def total_variation(x: Tensor) -> Tensor:
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


# ---------------------------------------------------------------------------------------------
# the problem an attack solves


@dataclass
class Problem:
    capture: Capture
    victim: Victim
    spec: SimSpec
    batches: list[slice]
    target: list[Tensor]
    batch: int  # dummy samples

    def update(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return simulate(self.victim, self.spec, x, y, self.batches)


def make_problem(capture: Capture, *, double: bool = True, assume_full_batch: bool = False) -> Problem:
    spec = SimSpec.from_capture(capture)
    batches = schedule(spec, assume_full_batch=assume_full_batch)
    victim = Victim(capture, dtype=torch.float64 if double else torch.float32)
    target = target_update(victim, spec, capture)
    if not all(torch.isfinite(t).all() for t in target):
        raise AttackError("the captured update holds NaN or inf values")
    return Problem(capture, victim, spec, batches, target, dummy_batch_size(spec, batches))


def _last_layer(victim: Victim) -> tuple[int | None, int | None]:
    """Indices (into victim.names) of the classifier's weight (K, h) and bias (K,)."""
    k = victim.num_classes
    w_idx = b_idx = None
    for i, p in enumerate(victim.params):
        if p.dim() == 2 and p.shape[0] == k:
            w_idx = i
            b_idx = i + 1 if i + 1 < len(victim.params) and tuple(victim.params[i + 1].shape) == (k,) else None
    return w_idx, b_idx


def count_labels(gb: np.ndarray, batch: int, p_mean: np.ndarray | None = None) -> np.ndarray:
    """Label multiset of a batch from the (pseudo-)gradient of the last-layer bias
    ``g_b = mean_i softmax_i - counts / B``; ``p_mean`` estimates ``mean_i softmax_i`` (see the
    module docstring). Returns sorted class indices, one per sample."""
    k = len(gb)
    if p_mean is None:
        pos = gb[gb > 0]
        p_mean = np.full(k, float(pos.mean()) if len(pos) else 1.0 / k)
    counts = np.zeros(k, dtype=np.int64)
    order = np.argsort(gb, kind="stable")
    present = [int(c) for c in order if gb[c] < 0][:batch]
    counts[present] = 1
    est = batch * (p_mean - gb)
    while counts.sum() < batch:
        c = int(np.argmax(est - counts))
        counts[c] += 1
    return np.repeat(np.arange(k), counts)


def mean_softmax(victim: Victim, samples: int = 64, seed: int = 0) -> np.ndarray:
    """The served model's mean softmax over random U[0, 1] inputs: the estimate of the batch's mean
    prediction used to turn the bias gradient into label counts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((samples, *victim.in_shape), generator=g, dtype=victim.dtype)
    with torch.no_grad():
        return torch.softmax(victim.logits(victim.params, x), dim=-1).mean(0).cpu().numpy()


def infer_labels(problem: Problem, use_header: bool = True) -> tuple[np.ndarray, str]:
    b = problem.batch
    hdr = dict(problem.capture.header.label_counts) if use_header else {}
    if hdr and sum(hdr.values()) == b and all(0 <= int(c) < problem.victim.num_classes for c in hdr):
        return np.repeat(np.array(sorted(hdr), dtype=np.int64), [hdr[c] for c in sorted(hdr)]), "header"
    w_idx, b_idx = _last_layer(problem.victim)
    if w_idx is None:
        raise AttackError("cannot infer labels: no final dense layer with one row per class")
    scale = momentum_scale(problem.spec) if not (problem.spec.kind == "gradient" or problem.spec.single_sgd_step) else 1.0
    gw = problem.target[w_idx].detach().cpu().numpy() / scale
    if b == 1:
        return np.array([int(np.argmin(gw.sum(axis=1)))], dtype=np.int64), "idlg-weight-rows"
    if b_idx is not None:
        gb = problem.target[b_idx].detach().cpu().numpy() / scale
        return count_labels(gb, b, mean_softmax(problem.victim)), "bias-counts"
    return count_labels(gw.sum(axis=1), b), "weight-row-counts"  # no bias: presence + a flat prior


def label_orders(labels: np.ndarray, batches: list[slice], limit: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct ways to deal the inferred label multiset into the local steps' mini-batches.

    With several distinct mini-batches (a multi-step delta over in-order batches) it matters which
    labels share a batch, and the update's last layer only reveals the multiset. Orderings that
    differ only within a batch are equivalent; at most ``limit`` distinct ones are returned (a
    seeded random subset, the sorted order first)."""
    spans = sorted({(sl.start, sl.stop) for sl in batches})
    if len(spans) <= 1 or len(set(labels.tolist())) <= 1:
        return [labels]

    def canon(order: np.ndarray) -> tuple:
        return tuple(tuple(sorted(order[a:b].tolist())) for a, b in spans)

    found: dict[tuple, np.ndarray] = {canon(labels): labels}
    rng = np.random.default_rng(seed)
    if len(labels) <= 8:
        for perm in itertools.permutations(range(len(labels))):
            order = labels[list(perm)]
            found.setdefault(canon(order), order)
    else:
        for _ in range(200 * limit):
            order = labels[rng.permutation(len(labels))]
            found.setdefault(canon(order), order)
            if len(found) >= 4 * limit:
                break
    keys = list(found)
    if len(keys) > limit:
        pick = [0] + sorted(rng.choice(np.arange(1, len(keys)), size=limit - 1, replace=False).tolist())
        keys = [keys[i] for i in pick]
    return [found[k] for k in keys]


# ---------------------------------------------------------------------------------------------
# attacks


class _Matching(Attack):
    defaults: dict[str, Any] = {
        "iterations": 300, "restarts": 1, "seed": 0, "lr": 1.0, "progress_every": 10,
        "assume_full_batch": False, "double": True, "threads": 1,
    }

    def opt(self, key: str) -> Any:
        if key in self.options:
            return self.options[key]
        return self.defaults[key]

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise AttackError(f"{self.name}: unknown option(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(self.defaults))}")
        super().__init__(**options)

    def _reconstruct(self, capture: Capture, progress: Progress | None) -> Reconstruction:
        threads = torch.get_num_threads()
        torch.set_num_threads(int(self.opt("threads")))
        try:
            problem = make_problem(capture, double=bool(self.opt("double")),
                                   assume_full_batch=bool(self.opt("assume_full_batch")))
            return self._run(problem, progress)
        finally:
            torch.set_num_threads(threads)

    def _run(self, problem: Problem, progress: Progress | None) -> Reconstruction:
        raise NotImplementedError

    def _gen(self, restart: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.opt("seed")) * 1000 + restart)


def _lbfgs(problem: Problem, x: Tensor, y: Tensor, distance: Distance, *, iterations: int, lr: float,
           inner: int, joint_label: bool, progress: Progress | None, every: int,
           offset: int = 0, total: int | None = None, line_search: str | None = None) -> dict[str, Any]:
    """DLG's optimisation loop: L-BFGS over the dummy image (and label logits if joint)."""
    vars_ = [x, y] if joint_label else [x]
    # torch caps evaluations per step at 5/4 * max_iter, which starves a line search when inner is small
    max_eval = inner * 5 // 4 + (25 if line_search else 0)
    opt = torch.optim.LBFGS(vars_, lr=lr, max_iter=inner, max_eval=max_eval, history_size=100,
                            line_search_fn=line_search)
    evals = 0

    def closure() -> Tensor:
        nonlocal evals
        evals += 1
        opt.zero_grad()
        loss = distance(problem.update(x, y), problem.target)
        loss.backward()
        return loss

    best = (math.inf, x.detach().clone(), y.detach().clone())
    last = math.inf
    still = 0
    done = 0
    for it in range(iterations):
        loss = float(opt.step(closure).detach())
        done = it + 1
        if not math.isfinite(loss):
            log.info("L-BFGS diverged at outer step %d; keeping the best iterate", it)
            break
        if loss < best[0]:
            best = (loss, x.detach().clone(), y.detach().clone())
        if progress and (done % every == 0 or done == iterations):
            progress(offset + done, total or iterations, {"loss": loss, "x": _np(x), "evaluations": evals})
        still = still + 1 if loss >= last else 0
        last = loss
        if still >= 5 or loss == 0.0:  # L-BFGS has stopped moving
            if progress and done % every:
                progress(offset + done, total or iterations, {"loss": loss, "x": _np(x), "evaluations": evals})
            break
    with torch.no_grad():
        x.copy_(best[1])
        y.copy_(best[2])
    return {"loss": best[0], "iterations": done, "evaluations": evals}


def _np(x: Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float32).clip(0.0, 1.0)


def _ig_loop(problem: Problem, x: Tensor, y: Tensor, *, iterations: int, lr: float, tv: float,
             progress: Progress | None, every: int, offset: int, total: int) -> float:
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
    loss_v = math.inf
    for it in range(iterations):
        opt.zero_grad()
        loss = cosine_distance(problem.update(x, y), problem.target)
        if tv > 0:
            loss = loss + tv * total_variation(x)
        loss.backward()
        assert x.grad is not None
        x.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        loss_v = float(loss.detach())
        if progress and ((it + 1) % every == 0 or it + 1 == iterations):
            progress(offset + it + 1, total, {"loss": loss_v, "x": _np(x)})
    # the loss of the final (clamped) image, comparable across restarts
    xf = x.detach()
    final = cosine_distance(problem.update(xf, y), problem.target)
    if tv > 0:
        final = final + tv * total_variation(xf)
    f = float(final.detach())
    return f if math.isfinite(f) else loss_v


_LBFGS_OPTIONS = {"inner": 20, "line_search": None}
_LABEL_OPTIONS = {"use_header_labels": True, "label_trials": 8}


@register
class DLG(_Matching):
    name = "dlg"
    summary = "Deep Leakage from Gradients: joint image + soft-label L2 gradient matching (L-BFGS)"
    defaults = {**_Matching.defaults, **_LBFGS_OPTIONS}

    def _run(self, problem: Problem, progress: Progress | None) -> Reconstruction:
        b, k = problem.batch, problem.victim.num_classes
        dt = problem.victim.dtype
        restarts = int(self.opt("restarts"))
        its = int(self.opt("iterations"))
        best: tuple[float, Tensor, Tensor, dict] | None = None
        for r in range(restarts):
            g = self._gen(r)
            x = torch.randn((b, *problem.victim.in_shape), generator=g, dtype=dt).requires_grad_(True)
            y = torch.randn((b, k), generator=g, dtype=dt).requires_grad_(True)
            st = _lbfgs(problem, x, y, l2_distance, iterations=its, lr=float(self.opt("lr")),
                        inner=int(self.opt("inner")), joint_label=True, progress=progress,
                        every=int(self.opt("progress_every")), offset=r * its, total=restarts * its,
                        line_search=self.opt("line_search"))
            if best is None or st["loss"] < best[0]:
                best = (st["loss"], x.detach(), y.detach(), st)
        assert best is not None
        loss, x, y, st = best
        labels = torch.argmax(y, dim=1).numpy()
        return Reconstruction(_np(x), labels, {**st, "label_source": "joint-soft-label", "distance": "l2"})


class _FixedLabelLBFGS(_Matching):
    distance_name = "l2"
    defaults = {**_Matching.defaults, **_LBFGS_OPTIONS, **_LABEL_OPTIONS}

    def _distance(self) -> Distance:
        return l2_distance

    def _run(self, problem: Problem, progress: Progress | None) -> Reconstruction:
        labels, source = infer_labels(problem, bool(self.opt("use_header_labels")))
        dt = problem.victim.dtype
        restarts = int(self.opt("restarts"))
        its = int(self.opt("iterations"))

        def attempt(r: int, y: Tensor, iterations: int, report: bool) -> tuple[dict, Tensor]:
            x = torch.randn((problem.batch, *problem.victim.in_shape), generator=self._gen(r),
                            dtype=dt).requires_grad_(True)
            st = _lbfgs(problem, x, y, self._distance(), iterations=iterations, lr=float(self.opt("lr")),
                        inner=int(self.opt("inner")), joint_label=False, progress=progress if report else None,
                        every=int(self.opt("progress_every")), offset=r * its, total=restarts * its,
                        line_search=self.opt("line_search"))
            return st, x.detach()

        orders = label_orders(labels, problem.batches, int(self.opt("label_trials")), int(self.opt("seed")))
        if len(orders) > 1:  # short screening run per way of dealing the labels into mini-batches
            screen = [attempt(0, torch.as_tensor(o), max(2, its // 10), False)[0]["loss"] for o in orders]
            labels = orders[int(np.argmin(screen))]
        y = torch.as_tensor(labels, dtype=torch.int64)
        best: tuple[float, Tensor, dict] | None = None
        for r in range(restarts):
            st, x = attempt(r, y, its, True)
            if best is None or st["loss"] < best[0]:
                best = (st["loss"], x, st)
        assert best is not None
        _, x, st = best
        return Reconstruction(_np(x), labels, {**st, "label_source": source, "label_orders_tried": len(orders),
                                               "distance": self.distance_name})


@register
class IDLG(_FixedLabelLBFGS):
    name = "idlg"
    summary = "improved DLG: label from the last-layer gradient, then L2 gradient matching (L-BFGS)"


@register
class WDLG(_FixedLabelLBFGS):
    name = "wdlg"
    summary = "Wasserstein DLG: iDLG label, then per-row 1-D Wasserstein (+ L2 alignment) gradient matching"
    defaults = {**_FixedLabelLBFGS.defaults, "distance": "sliced", "align": 1.0, "line_search": "strong_wolfe"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.opt("distance") not in ("sliced", "kr"):
            raise AttackError(f"wdlg: unknown distance {self.opt('distance')!r}; choose 'sliced' or 'kr'")

    def _distance(self) -> Distance:
        which = self.opt("distance")
        if which == "kr":
            self.distance_name = "wasserstein-kr-rows"
            return kr_distance
        if which == "sliced":
            self.distance_name = "sliced-w2-rows+l2"
            align = float(self.opt("align"))
            return lambda a, b: sliced_distance(a, b, align)
        raise AttackError(f"wdlg: unknown distance {which!r}; choose 'sliced' or 'kr'")


@register
class InvertingGradients(_Matching):
    name = "ig"
    summary = "Inverting Gradients: cosine matching + TV, signed Adam, restarts; simulates multi-step deltas"
    defaults = {**_Matching.defaults, **_LABEL_OPTIONS, "iterations": 1000, "restarts": 4, "lr": 0.1, "tv": 0.0,
                "init": "uniform", "progress_every": 10}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.opt("init") not in ("uniform", "gaussian"):
            raise AttackError(f"ig: unknown init {self.opt('init')!r}; choose 'uniform' or 'gaussian'")

    def _run(self, problem: Problem, progress: Progress | None) -> Reconstruction:
        labels, source = infer_labels(problem, bool(self.opt("use_header_labels")))
        dt = problem.victim.dtype
        restarts = int(self.opt("restarts"))
        its = int(self.opt("iterations"))
        init = self.opt("init")
        shape = (problem.batch, *problem.victim.in_shape)

        def attempt(r: int, y: Tensor, iterations: int, report: bool) -> tuple[float, Tensor]:
            g = self._gen(r)
            x0 = torch.rand(shape, generator=g, dtype=dt) if init == "uniform" else \
                (0.5 + 0.25 * torch.randn(shape, generator=g, dtype=dt)).clamp(0, 1)
            x = x0.requires_grad_(True)
            loss = _ig_loop(problem, x, y, iterations=iterations, lr=float(self.opt("lr")), tv=float(self.opt("tv")),
                            progress=progress if report else None, every=int(self.opt("progress_every")),
                            offset=r * its, total=restarts * its)
            return loss, x.detach().clone()

        orders = label_orders(labels, problem.batches, int(self.opt("label_trials")), int(self.opt("seed")))
        if len(orders) > 1:  # short screening run per way of dealing the labels into mini-batches
            screen = [attempt(0, torch.as_tensor(o), max(20, its // 10), False)[0] for o in orders]
            labels = orders[int(np.argmin(screen))]
        y = torch.as_tensor(labels, dtype=torch.int64)
        losses: list[float] = []
        best: tuple[float, Tensor] | None = None
        for r in range(restarts):
            loss, x = attempt(r, y, its, True)
            losses.append(loss)
            if best is None or loss < best[0]:
                best = (loss, x)
        assert best is not None
        return Reconstruction(_np(best[1]), labels, {"loss": best[0], "restart_losses": losses,
                                                     "iterations": its, "label_source": source,
                                                     "label_orders_tried": len(orders), "distance": "cosine+tv"})
