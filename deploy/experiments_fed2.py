"""Simulated federations for the aggregation strategies, and the Fed2 vs FedAvg experiment.

A federation here is the real pieces without the transport: kernel.data's split, the fog's
``local_update`` and the cloud's strategies, called in a loop (one local update per selected fog
per round). Attackers can replace their update (scaled or sign-flipped) before it reaches the
strategy.

Fed2 vs FedAvg table (docs/strategies.md)::

    python -m deploy.experiments_fed2 [--dataset digits|mnist5k] [--seeds 0 1 2] [--rounds 30]
                                      [--settings dirichlet0.1 classes2233] [--runs KEY ...]
                                      [--out runs/fed2.json]

Robust aggregators under attack (docs/strategies.md)::

    python -m deploy.experiments_fed2 --attack
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cloud.strategies import Fed2, FedAvg, Strategy
from fog.trainer import local_update
from kernel.config import RunConfig, build_config
from kernel.data import Dataset, load_dataset, make_splits
from kernel.models import build_model, count_params, get_params, set_params
from protos.control import TrainConfig

log = logging.getLogger(__name__)

Attack = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]


def scale_attack(factor: float) -> Attack:
    """The attacker sends ``factor`` times its honest update (``-1`` is a sign flip)."""

    def attack(_fog: int, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (v * np.float32(factor)).astype(np.float32) for k, v in update.items()}

    return attack


@dataclass
class SimResult:
    accuracy: list[float] = field(default_factory=list)  # after each round
    params: int = 0

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def evaluate(spec: dict, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    model = build_model(spec)
    set_params(model, params)
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def simulate(
    spec: dict,
    ds: Dataset,
    parts: Sequence[np.ndarray],
    test: np.ndarray,
    strategy: Strategy,
    train: TrainConfig,
    rounds: int,
    seed: int = 0,
    *,
    attackers: Sequence[int] = (),
    attack: Attack | None = None,
    fraction: float = 1.0,
    server_lr: float = 1.0,
    init: dict[str, np.ndarray] | None = None,
) -> SimResult:
    """Run ``rounds`` rounds; fog i trains on ``ds[parts[i]]``. Returns the test accuracy per round."""
    params = init if init is not None else get_params(build_model(spec, seed=seed))
    rng = np.random.default_rng([seed, 0x5E1])
    fog_ids = [f"fog-{i}" for i in range(len(parts))]
    res = SimResult(params=sum(v.size for v in params.values()))
    xt, yt = ds.x[test], ds.y[test]
    for r in range(1, rounds + 1):
        selected = strategy.select(fog_ids, fraction, rng)
        cfg = strategy.configure(r, train)
        strategy.begin_round(params, spec)
        for fid in selected:
            i = int(fid.removeprefix("fog-"))
            idx = parts[i]
            if len(idx) == 0:
                continue
            out = local_update(spec, params, ds.x[idx], ds.y[idx], cfg, seed=seed * 100_003 + r * 1009 + i)
            update = out.update
            if attack is not None and i in attackers:
                update = attack(i, update)
            labels, counts = np.unique(ds.y[idx], return_counts=True)
            meta = {"label_counts": {int(c): int(n) for c, n in zip(labels, counts, strict=True)}}
            strategy.add_update(fid, update, out.num_samples, cfg.update_kind, meta)
        params = strategy.end_round(server_lr)
        res.accuracy.append(evaluate(spec, params, xt, yt))
    return res


def federation_data(dataset: str, fogs: int, partition: str, seed: int, alpha: float = 0.1,
                    max_samples: int = 0) -> tuple[Dataset, list[np.ndarray], np.ndarray, RunConfig]:
    """kernel.data's split with one edge per fog and no warm-start set: fog i holds edge i's pool."""
    cfg = build_config(overrides=[
        ("seed", seed), ("data.dataset", dataset), ("data.partition", partition), ("data.alpha", alpha),
        ("data.max_samples", max_samples), ("topology.fogs", fogs), ("topology.edges_per_fog", 1),
        ("cloud.warm_start.per_class", 0),
    ], use_env=False)
    ds = load_dataset(cfg.data)
    sp = make_splits(cfg, ds)
    return ds, list(sp.edges), sp.test, cfg


# ---------------------------------------------------------------------------- Fed2 vs FedAvg
SETTINGS = {
    # name: (partition, fogs, alpha)
    "dirichlet0.1": ("dirichlet", 10, 0.1),
    "classes2233": ("classes", 4, 0.0),
}


def fed2_specs(ds: Dataset) -> dict[str, dict]:
    """The models compared: Fed2's grouped net, and the plain CNN sized to a similar parameter count."""
    small = ds.shape[1] < 16
    fed2 = {"arch": "fed2", "in_shape": list(ds.shape), "num_classes": ds.num_classes, "groups": 5,
            "channels": 16, "hidden": 128, "activation": "relu"}
    cnn = {"arch": "cnn", "in_shape": list(ds.shape), "num_classes": ds.num_classes, "channels": 16,
           "hidden": 96 if small else 24, "activation": "relu"}
    return {"fed2": fed2, "cnn": cnn}


RUNS = {
    # key: (strategy factory, model)
    "fedavg+cnn": (FedAvg, "cnn"),
    "fed2[samples]": (lambda: Fed2(weighting="samples"), "fed2"),  # = FedAvg on the Fed2 net
    "fed2[features]": (lambda: Fed2(weighting="features"), "fed2"),
    "fed2[classes]": (lambda: Fed2(weighting="classes"), "fed2"),
}


def run_fed2_experiment(dataset: str = "digits", seeds: Sequence[int] = (0, 1, 2), rounds: int = 30,
                        settings: Sequence[str] = tuple(SETTINGS), train: TrainConfig | None = None,
                        runs: Sequence[str] = tuple(RUNS),
                        progress: Callable[[str], None] | None = None) -> dict:
    """For each setting and seed: FedAvg on the CNN and Fed2 (the grouped net + feature-paired
    averaging) under each weighting. Same split, initial-model seed, local training config and
    rounds for all."""
    train = train or TrainConfig(local_epochs=2, lr=0.05, batch_size=32, momentum=0.9)
    table: dict = {"dataset": dataset, "rounds": rounds, "seeds": list(seeds), "train": train.model_dump(),
                   "settings": {}}
    for name in settings:
        partition, fogs, alpha = SETTINGS[name]
        final: dict[str, list[float]] = {k: [] for k in runs}
        last5: dict[str, list[float]] = {k: [] for k in runs}
        curves: dict[str, list[list[float]]] = {k: [] for k in runs}
        for seed in seeds:
            ds, parts, test, _ = federation_data(dataset, fogs, partition, seed, alpha=alpha or 0.5)
            specs = fed2_specs(ds)
            for key in runs:
                factory, arch = RUNS[key]
                t0 = time.perf_counter()
                res = simulate(specs[arch], ds, parts, test, factory(), train, rounds, seed)
                final[key].append(res.final)
                last5[key].append(float(np.mean(res.accuracy[-5:])))
                curves[key].append(res.accuracy)
                if progress:
                    progress(f"{dataset} {name} seed {seed} {key}: final {res.final:.4f}, last-5 mean "
                             f"{last5[key][-1]:.4f} ({time.perf_counter() - t0:.1f}s)")
        specs = fed2_specs(ds)
        table["settings"][name] = {
            "partition": partition, "fogs": fogs, "alpha": alpha if partition == "dirichlet" else None,
            "params": {a: count_params(build_model(specs[a])) for a in specs},
            "final": final, "last5": last5,
            "mean": {k: float(np.mean(v)) for k, v in final.items()},
            "last5_mean": {k: float(np.mean(v)) for k, v in last5.items()},
            "curves": curves,
        }
    return table


def format_table(table: dict) -> str:
    runs = list(next(iter(table["settings"].values()))["final"])
    lines = [f"dataset {table['dataset']}, {table['rounds']} rounds, seeds {table['seeds']}; "
             "cell: mean final accuracy (per seed) / mean of the last 5 rounds",
             "| setting | params cnn / fed2 | " + " | ".join(runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for name, s in table["settings"].items():
        cells = []
        for k in runs:
            per = ", ".join(f"{v:.3f}" for v in s["final"][k])
            cells.append(f"{s['mean'][k]:.3f} ({per}) / {s['last5_mean'][k]:.3f}")
        lines.append(f"| {name} ({s['fogs']} fogs) | {s['params']['cnn']} / {s['params']['fed2']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def attack_table(rounds: int = 20, factors: Sequence[float] = (-10.0, 50.0, -1.0),
                 attackers: Sequence[int] = (3, 7), progress: Callable[[str], None] | None = None) -> dict:
    """The robust aggregators under attack (tests/test_strategies.py asserts on the same setup):
    10 fogs on IID digits, an MLP(32), 2 local epochs; cell = mean test accuracy of the last 3 rounds."""
    from cloud.strategies import Krum, Median, TrimmedMean

    ds, parts, test, _ = federation_data("digits", 10, "iid", seed=0)
    spec = {"arch": "mlp", "in_shape": list(ds.shape), "num_classes": 10, "hidden": 32, "activation": "relu"}
    train = TrainConfig(local_epochs=2, lr=0.05, batch_size=32, momentum=0.9)
    strategies: dict[str, Callable[[], Strategy]] = {
        "fedavg": FedAvg, "median": Median, "trimmed_mean": lambda: TrimmedMean(0.2),
        "krum": lambda: Krum(2), "multi-krum(8)": lambda: Krum(2, multi=8),
    }
    out: dict = {"rounds": rounds, "attackers": list(attackers), "rows": {}}
    for label, factor in [("none", None), *((f"x{f:g}", f) for f in factors)]:
        row = {}
        for name, make in strategies.items():
            att = scale_attack(factor) if factor is not None else None
            res = simulate(spec, ds, parts, test, make(), train, rounds, seed=0, attackers=attackers, attack=att)
            row[name] = float(np.mean(res.accuracy[-3:]))
        out["rows"][label] = row
        if progress:
            progress(f"attack {label}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.experiments_fed2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist5k"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--attack", action="store_true", help="print the robust aggregators' table under attack instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.attack:
        table = attack_table(progress=lambda m: print(m, flush=True))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(table, f, indent=1)
        return 0
    train = TrainConfig(local_epochs=args.local_epochs, lr=0.05, batch_size=32, momentum=0.9)
    table = run_fed2_experiment(args.dataset, args.seeds, args.rounds, args.settings, train, args.runs,
                                progress=lambda m: print(m, flush=True))
    print(format_table(table))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
