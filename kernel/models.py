"""Model definitions shared by fog, cloud and attacks (needs torch; the edge never imports this).

A model is described by an *arch spec*, a JSON-able dict
``{"arch": name, "in_shape": [C, H, W], "num_classes": K, ...}``; the spec travels in model
headers and captures so that any party can rebuild the exact module. Parameters travel as an
ordered name -> float32 array mapping (``named_parameters`` order).
"""

from __future__ import annotations

import io
import json
import math
import threading
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from kernel.config import ModelConfig
from kernel.errors import ModelError

_ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
}
ARCHS: dict[str, Callable[[dict], nn.Module]] = {}
_EXPORT_LOCK = threading.Lock()


def register_arch(name: str):
    def deco(fn: Callable[[dict], nn.Module]):
        ARCHS[name] = fn
        return fn

    return deco


def _act(spec: dict) -> nn.Module:
    name = spec.get("activation", "relu")
    if name not in _ACTS:
        raise ModelError(f"unknown activation {name!r} ({', '.join(_ACTS)})")
    return _ACTS[name]()


@register_arch("mlp")
def _mlp(spec: dict) -> nn.Module:
    """Flatten -> Linear(d, hidden) -> act -> Linear(hidden, K). The first layer has a bias,
    which is what the analytic attack of Qian et al. exploits."""
    c, h, w = spec["in_shape"]
    hidden = spec.get("hidden", 128)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(c * h * w, hidden), _act(spec)]
    for extra in spec.get("extra_hidden", []):
        layers += [nn.Linear(hidden, extra), _act(spec)]
        hidden = extra
    layers.append(nn.Linear(hidden, spec["num_classes"]))
    return nn.Sequential(*layers)


@register_arch("cnn")
def _cnn(spec: dict) -> nn.Module:
    """Two conv blocks (3x3, pad 1, act, 2x2 max-pool) then FC(hidden) and FC(K)."""
    c, h, w = spec["in_shape"]
    ch = spec.get("channels", 16)
    hidden = spec.get("hidden", 128)
    return nn.Sequential(
        nn.Conv2d(c, ch, 3, padding=1), _act(spec), nn.MaxPool2d(2),
        nn.Conv2d(ch, 2 * ch, 3, padding=1), _act(spec), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * ch * (h // 4) * (w // 4), hidden), _act(spec),
        nn.Linear(hidden, spec["num_classes"]),
    )


@register_arch("lenet")
def _lenet(spec: dict) -> nn.Module:
    """The DLG paper's LeNet: three 5x5 conv layers of 12 channels, strides 2/2/1, padding 2,
    sigmoid activations, one FC layer. Weights are drawn U(-0.5, 0.5) when spec["dlg_init"]."""
    c, h, w = spec["in_shape"]
    act = spec.get("activation", "sigmoid")
    a = _ACTS[act]
    ch = spec.get("channels", 12)
    model = nn.Sequential(
        nn.Conv2d(c, ch, 5, stride=2, padding=2), a(),
        nn.Conv2d(ch, ch, 5, stride=2, padding=2), a(),
        nn.Conv2d(ch, ch, 5, stride=1, padding=2), a(),
        nn.Flatten(),
        nn.Linear(ch * math.ceil(h / 4) * math.ceil(w / 4), spec["num_classes"]),
    )
    if spec.get("dlg_init", False):
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-0.5, 0.5)
    return model


@register_arch("convfc")
def _convfc(spec: dict) -> nn.Module:
    """One conv layer (``channels`` filters, kernel ``kernel``, stride ``stride``, padding
    ``kernel//2``) -> act -> Flatten -> Linear(hidden) -> act -> Linear(K). The minimal CNN of the
    two-step reconstruction: its conv output has channels*d'^2 values for an input of C*d^2."""
    c, h, w = spec["in_shape"]
    ch = spec.get("channels", 16)
    k = spec.get("kernel", 3)
    s = spec.get("stride", 1)
    hidden = spec.get("hidden", 128)
    ho = (h + 2 * (k // 2) - k) // s + 1
    wo = (w + 2 * (k // 2) - k) // s + 1
    return nn.Sequential(
        nn.Conv2d(c, ch, k, stride=s, padding=k // 2), _act(spec),
        nn.Flatten(),
        nn.Linear(ch * ho * wo, hidden), _act(spec),
        nn.Linear(hidden, spec["num_classes"]),
    )


def arch_spec(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> dict:
    spec = {
        "arch": cfg.arch,
        "in_shape": [int(v) for v in in_shape],
        "num_classes": int(num_classes),
        "hidden": cfg.hidden,
        "channels": cfg.channels,
        "activation": cfg.activation,
    }
    if cfg.arch == "lenet":
        spec["channels"] = 12
        spec["activation"] = "sigmoid" if cfg.activation == "relu" else cfg.activation
    if cfg.arch == "fed2":
        spec["groups"] = cfg.groups
    return spec


def build_model(spec: Mapping | str, seed: int | None = None) -> nn.Module:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            raise ModelError("architecture spec is not valid JSON") from None
    spec = dict(spec)
    name = spec.get("arch")
    if name == "fed2" and "fed2" not in ARCHS:
        import kernel.fed2  # noqa: F401  (registers itself)
    if name not in ARCHS:
        raise ModelError(f"unknown architecture {name!r} ({', '.join(sorted(ARCHS))})")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ARCHS[name](spec)
    return ARCHS[name](spec)


def get_params(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.named_parameters()}


def set_params(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    own = dict(model.named_parameters())
    missing = set(own) - set(params)
    extra = set(params) - set(own)
    if missing or extra:
        raise ModelError(f"parameter names differ from the architecture (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]})")
    with torch.no_grad():
        for k, p in own.items():
            arr = params[k]
            if tuple(arr.shape) != tuple(p.shape):
                raise ModelError(f"parameter {k}: shape {tuple(arr.shape)} != architecture's {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))


def export_onnx(model: nn.Module, in_shape: tuple[int, ...] | list[int]) -> bytes:
    """ONNX bytes (weights embedded), input ``x`` (n, C, H, W) float32, output ``logits``.

    Uses the TorchScript exporter (``dynamo=False``): it needs no onnxscript and embeds the
    weights in one buffer instead of a side ``.data`` file."""
    model = model.eval()
    buf = io.BytesIO()
    dummy = torch.zeros((1, *in_shape), dtype=torch.float32)
    with _EXPORT_LOCK:  # the exporter keeps global state: one export at a time per process
        torch.onnx.export(
            model, (dummy,), buf, dynamo=False, input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17,
        )
    return buf.getvalue()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
