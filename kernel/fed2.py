"""Fed2's grouped architecture (Yu et al., KDD 2021: structure adaptation for feature-aligned FL).

    x ─ shared: Conv(C→ch, 3×3) → act → [MaxPool 2 if the input is ≥ 16 px]
      ─ split:  Conv(ch→G·gw, 3×3)   output channels [j·gw, (j+1)·gw) belong to group j
      ─ act ─ gconv: Conv(G·gw→G·gw, 3×3, groups=G)   rows [j·gw, (j+1)·gw) belong to group j
      ─ act ─ MaxPool 2 ─ per group j: heads.j = Linear(gw·h'·w' → hg) → act → Linear(hg → |classes_j|)
      ─ logits of group j's classes come from heads.j only

The first conv layer is shared by every class; from ``split`` on, group j's features are
computed from the shared features by group j's filters only, and the logit of a class is a function
of the shared layers and of its own group's parameters only. So the gradient of a class's logit
reaches no other group. (Under softmax cross-entropy a sample of class c still pushes the *other*
classes' logits down through the softmax, as in the paper's model; the isolation is of the class's
own path.)

Class → group allocation is fixed at initialisation and identical on every participant:
``"mod"`` (default) puts class c in group c mod G; ``"block"`` puts contiguous blocks of
classes in each group (sizes differ by at most one). Spec keys: ``groups`` (G, ≤ num_classes),
``channels`` (shared conv width, default 16), ``group_channels`` (gw, default max(4, 2·channels/G)),
``hidden`` (total head width, split evenly over groups: hg = max(4, hidden / G)), ``group_assign``.

``fed2_param_groups(spec)`` says which group owns each parameter, or each slice of a grouped
parameter (slices are along dimension 0); the cloud's feature-paired averaging uses it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from kernel.errors import ModelError
from kernel.models import _act, register_arch

SHARED = -1  # the "group" of a parameter every class uses


def fed2_dims(spec: Mapping) -> dict[str, int]:
    """The layer widths the spec implies (shared channels, group count, group width, head width)."""
    k = int(spec["num_classes"])
    g = int(spec.get("groups", 5))
    if not 1 <= g <= k:
        raise ModelError(f"fed2 needs 1 <= groups <= num_classes ({k}), got groups={g}")
    ch = int(spec.get("channels", 16))
    gw = int(spec.get("group_channels", 0)) or max(4, (2 * ch) // g)
    hg = max(4, int(spec.get("hidden", 128)) // g)
    return {"groups": g, "channels": ch, "group_channels": gw, "head_hidden": hg}


def fed2_class_groups(spec: Mapping) -> list[list[int]]:
    """Classes of each group, in the order their logits are produced."""
    k = int(spec["num_classes"])
    g = fed2_dims(spec)["groups"]
    how = spec.get("group_assign", "mod")
    if how == "mod":
        return [[c for c in range(k) if c % g == j] for j in range(g)]
    if how == "block":
        bounds = [round(j * k / g) for j in range(g + 1)]
        return [list(range(bounds[j], bounds[j + 1])) for j in range(g)]
    raise ModelError(f"fed2 group_assign must be 'mod' or 'block', got {how!r}")


class Fed2Net(nn.Module):
    def __init__(self, spec: Mapping) -> None:
        super().__init__()
        c, h, w = (int(v) for v in spec["in_shape"])
        d = fed2_dims(spec)
        g, ch, gw, hg = d["groups"], d["channels"], d["group_channels"], d["head_hidden"]
        self.groups, self.group_width = g, gw
        self.class_groups = fed2_class_groups(spec)
        pool_first = min(h, w) >= 16
        self.shared = nn.Sequential(nn.Conv2d(c, ch, 3, padding=1), _act(spec),
                                    *([nn.MaxPool2d(2)] if pool_first else []))
        hs, ws = (h // 2, w // 2) if pool_first else (h, w)
        self.split = nn.Conv2d(ch, g * gw, 3, padding=1)
        self.gconv = nn.Conv2d(g * gw, g * gw, 3, padding=1, groups=g)
        self.act1, self.act2 = _act(spec), _act(spec)
        self.pool = nn.MaxPool2d(2)
        feat = gw * (hs // 2) * (ws // 2)
        if feat == 0:
            raise ModelError(f"fed2: input {h}x{w} is too small (need at least 2x2 after the shared block)")
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(feat, hg), _act(spec), nn.Linear(hg, len(cls))) for cls in self.class_groups
        )
        order = [cl for cls in self.class_groups for cl in cls]  # position in the concatenated logits
        pos = [order.index(cl) for cl in range(int(spec["num_classes"]))]
        self.register_buffer("logit_pos", torch.tensor(pos, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.shared(x)
        z = self.pool(self.act2(self.gconv(self.act1(self.split(z)))))
        b = z.shape[0]
        parts = z.reshape(b, self.groups, -1)  # channels of group j are contiguous
        out = torch.cat([head(parts[:, j]) for j, head in enumerate(self.heads)], dim=1)
        return out.index_select(1, self.logit_pos)

    def param_groups(self) -> dict[str, list[tuple[int, slice | None]]]:
        gw = self.group_width
        out: dict[str, list[tuple[int, slice | None]]] = {}
        for name, _ in self.named_parameters():
            if name.startswith("shared."):
                out[name] = [(SHARED, None)]
            elif name.startswith(GROUPED_CONVS):
                out[name] = [(j, slice(j * gw, (j + 1) * gw)) for j in range(self.groups)]
            elif name.startswith("heads."):
                out[name] = [(int(name.split(".")[1]), None)]
            else:  # pragma: no cover - every parameter is listed above
                raise ModelError(f"fed2: parameter {name} has no group")
        return out


@register_arch("fed2")
def _fed2(spec: dict) -> nn.Module:
    return Fed2Net(spec)


GROUPED_CONVS = ("split.", "gconv.")  # name prefixes of the grouped convolutions (the group features)


def fed2_param_groups(spec: Mapping) -> dict[str, list[tuple[int, slice | None]]]:
    """``{param name: [(group, slice along dim 0 or None for the whole tensor), ...]}``;
    group ``SHARED`` (-1) marks the shared layers. Covers every parameter, in model order."""
    with torch.random.fork_rng(devices=[]):
        return Fed2Net(spec).param_groups()
