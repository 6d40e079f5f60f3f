"""``fogfl study GRID.yaml --out DIR``: run every cell of a grid of federations, resumably, and
report accuracy, labels, bytes and leakage over seeds.

A grid file (YAML, validated; unknown keys are one-line errors naming the key)::

    name: active-vs-random              # used in titles and in --report-md markers
    description: one paragraph
    base:                               # the config every cell starts from
      presets: [nonmassive]             # preset names or YAML files, layered over default.yaml
      set: {data.dataset: mnist5k}      # overrides (dotted keys or nested mappings)
    rounds: 10                          # shorthand for base.set.rounds
    seeds: [0, 1]
    axes:                               # cells = product of the axes, in this order
      sampling: [random, uncertainty]   # a known axis takes plain values ...
      budget: [10, 20, 40]
      heterogeneity:                    # ... or a mapping  label -> overrides
        iid: {data.partition: iid}
        skewed: {data.partition: dirichlet, data.alpha: 0.1}
      train.local_epochs: [1, 5]        # a dotted config key is an axis too
    leakage:                            # optional: attack captured fog updates
      methods: [analytic]
      captures_per_cell: 2              # at most this many captures per cell and seed
      rounds: [1]                       # rounds whose captures are attacked ([] = any)
      options: {minimal: {iterations: 300}}
    output:
      accuracy_targets: [0.9]           # adds labels_at_0.9 = labels used when accuracy first >= 0.9
      tables: [{title: ..., rows: [sampling], cols: budget, metric: final_accuracy}]
      heatmaps: [{rows: sampling, cols: heterogeneity, metric: leak_ssim_mean}]

Known axes and their plain values: ``sampling`` (acquisition.strategy), ``heterogeneity``
(``iid``, ``classes`` / ``2/2/3/3``, ``dirichlet-<alpha>``), ``topology`` (a preset name, or
``<fogs>x<edges>[@<fraction>]``), ``strategy`` (cloud.strategy), ``defense`` (``none``,
``clip-<c>``, ``dp-<sigma>`` = clip 1 + noise sigma, ``noise-<sigma>``, ``prune-<ratio>``,
``masking``, joined by ``+``), ``budget`` (acquisition.budget), ``local_epochs``, ``rounds``.
A mapping entry may hold ``presets`` (extra preset layers) and ``tags`` (extra CSV columns) beside
its overrides.

Layout of DIR::

    cells/<cell-id>/seed-<s>/result.json   written last, atomically: the cell is done
    results.csv      one row per cell and seed (deterministic: no timings)
    rounds.csv       one row per cell, seed and round
    summary.csv      mean and std over seeds per cell
    timings.csv      wall time per cell and seed (this is where timings live)
    plots/*.png, report.html (self-contained), study.json (what this invocation did)

A rerun skips every cell whose ``result.json`` says ``ok`` for the same config (hash); failed
or changed cells run again. Configs are built without ``FOGFL_*`` environment overrides, so a
study means the same on every machine.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import csv
import hashlib
import html
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kernel.config import RunConfig, build_config, dump_config, read_yaml
from kernel.errors import ConfigError, FogflError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
STUDY_RUN_ID = "study"
RESULT_FILE = "result.json"

# Attack names the grid may ask for (the registry is checked too when it imports).
KNOWN_ATTACKS = ("analytic", "minimal", "cnn-analytic", "mkor", "dlg", "idlg", "ig", "wdlg")

# Loggers of the tiers, quietened while a study runs (their per-round INFO lines would bury the bar).
_TIER_LOGGERS = ("cloud", "fog", "edge", "deploy.engine", "deploy.launcher", "attacks", "kernel")


# =============================================================================== grid schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseSpec(_Strict):
    presets: list[str] = Field(default_factory=list, description="preset names or YAML files over default.yaml")
    set: dict[str, Any] = Field(default_factory=dict, description="config overrides, dotted or nested")


class LeakageSpec(_Strict):
    methods: list[str] = Field(default_factory=list, description="attacks to run; empty = no leakage")
    captures_per_cell: int = Field(2, ge=1, description="attack at most this many captures per cell and seed")
    rounds: list[int] = Field(default_factory=lambda: [1], description="rounds whose captures are attacked ([] = any)")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-attack options")


class TableSpec(_Strict):
    title: str
    rows: list[str]
    cols: str | None = None
    metric: str = "final_accuracy"
    format: str = ".3f"
    std: bool = True
    where: dict[str, str] = Field(default_factory=dict, description="keep cells whose axis label equals this")


class HeatmapSpec(_Strict):
    rows: str
    cols: str
    metric: str
    title: str = ""
    where: dict[str, str] = Field(default_factory=dict)


class ReferenceSpec(_Strict):
    axis: str
    level: str


class OutputSpec(_Strict):
    plots: bool = True
    report: bool = True
    accuracy_targets: list[float] = Field(default_factory=list)
    reference: ReferenceSpec | None = Field(
        None, description="adds ref_accuracy (mean final accuracy of this axis level, other axes equal) and "
                          "labels_to_ref (labels used when a run first reaches it)")
    tables: list[TableSpec] = Field(default_factory=list)
    heatmaps: list[HeatmapSpec] = Field(default_factory=list)
    keep_captures: bool = False
    keep_checkpoints: bool = False
    publish_plots: list[str] | None = Field(
        None, description="plot names (file stems, e.g. accuracy_vs_labels) that --plots-to copies (default: all)")


class EmulateSpec(_Strict):
    """What-ifs for features the tiers do not have (yet), emulated in the in-process engine only."""

    warm_start_at_fogs: bool = Field(
        False, description="fogs train on their pool plus the cloud's warm-start set (the labelled seed set)")


class GridSpec(_Strict):
    name: str
    description: str = ""
    base: BaseSpec = Field(default_factory=BaseSpec)
    rounds: int | None = Field(None, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    axes: dict[str, Any] = Field(default_factory=dict)
    engine: Literal["inprocess", "network"] = "inprocess"
    timeout_s: float = Field(900.0, gt=0, description="network engine: give up on a cell after this long")
    leakage: LeakageSpec = Field(default_factory=LeakageSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    emulate: EmulateSpec = Field(default_factory=EmulateSpec)


KNOWN_AXES = ("sampling", "heterogeneity", "topology", "strategy", "defense", "budget", "local_epochs", "rounds")


def _grid_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"grid key '{where}' is unknown"
    if err["type"] == "missing":
        return f"grid key '{where}' is required"
    return f"grid key '{where}': {err['msg']}"


# =============================================================================== axes -> overrides
@dataclass(frozen=True)
class Level:
    """One value of one axis: its label and what it does to the config."""

    axis: str
    label: str
    presets: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()
    tags: tuple[tuple[str, Any], ...] = ()
    emulate: tuple[tuple[str, Any], ...] = ()


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def _heterogeneity(v: Any, where: str) -> list[tuple[str, Any]]:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return [("data.partition", "dirichlet"), ("data.alpha", float(v))]
    s = str(v).strip().lower()
    if s == "iid":
        return [("data.partition", "iid")]
    if s in ("classes", "2/2/3/3", "2233", "class-split"):
        return [("data.partition", "classes")]
    m = re.fullmatch(r"(?:dirichlet|dir)[-_=]?" + _NUM, s)
    if m:
        return [("data.partition", "dirichlet"), ("data.alpha", float(m.group(1)))]
    raise ConfigError(f"grid {where}: heterogeneity {v!r} is not iid, classes (2/2/3/3) or dirichlet-<alpha>")


def _defense(v: Any, where: str) -> list[tuple[str, Any]]:
    s = str(v).strip().lower()
    if s in ("none", "off", ""):
        return []
    out: list[tuple[str, Any]] = []
    for part in s.split("+"):
        if part in ("masking", "mask", "secagg"):
            out.append(("defense.masking", True))
            continue
        m = re.fullmatch(r"(clip|dp|noise|prune)[-_=]?" + _NUM, part)
        if not m:
            raise ConfigError(f"grid {where}: defense {v!r}: {part!r} is not none, clip-<c>, dp-<sigma>, "
                              f"noise-<sigma>, prune-<ratio> or masking")
        kind, num = m.group(1), float(m.group(2))
        if kind == "clip":
            out.append(("defense.clip", num))
        elif kind == "dp":
            out += [("defense.clip", 1.0), ("defense.noise_sigma", num)]
        elif kind == "noise":
            out.append(("defense.noise_sigma", num))
        else:
            out.append(("defense.prune_ratio", num))
    return out


def _topology(v: Any, where: str) -> tuple[tuple[str, ...], list[tuple[str, Any]]]:
    s = str(v).strip()
    m = re.fullmatch(r"(\d+)x(\d+)(?:@" + _NUM + r")?", s)
    if m:
        sets = [("topology.fogs", int(m.group(1))), ("topology.edges_per_fog", int(m.group(2)))]
        if m.group(3):
            sets.append(("topology.fraction", float(m.group(3))))
        return (), sets
    return (s,), []


def _plain_level(axis: str, value: Any, where: str) -> Level:
    """A plain (list) value of a known axis or of a dotted config key."""
    if isinstance(value, dict | list):
        raise ConfigError(f"grid {where}: a list axis takes plain values; use a mapping label -> overrides instead")
    label = str(value).lower() if isinstance(value, bool) else str(value)
    presets: tuple[str, ...] = ()
    if "." in axis:
        sets: list[tuple[str, Any]] = [(axis, value)]
    elif axis == "sampling":
        from edge.strategies import canonical

        try:
            sets = [("acquisition.strategy", canonical(str(value)))]
        except ConfigError as exc:
            raise ConfigError(f"grid {where}: {exc}") from None
    elif axis == "heterogeneity":
        sets = _heterogeneity(value, where)
    elif axis == "topology":
        presets, sets = _topology(value, where)
    elif axis == "strategy":
        sets = [("cloud.strategy", value)]
    elif axis == "defense":
        sets = _defense(value, where)
    elif axis == "budget":
        sets = [("acquisition.budget", value)]
    elif axis == "local_epochs":
        sets = [("train.local_epochs", value)]
    elif axis == "rounds":
        sets = [("rounds", value)]
    else:  # pragma: no cover - callers check the name first
        raise ConfigError(f"grid key 'axes.{axis}' is unknown")
    return Level(axis, label, presets, tuple(sets))


def _mapping_level(axis: str, label: str, value: Any, where: str) -> Level:
    if not isinstance(value, dict):
        if axis in KNOWN_AXES or "." in axis:
            lvl = _plain_level(axis, value, where)
            return Level(axis, str(label), lvl.presets, lvl.overrides)
        raise ConfigError(f"grid {where}: expected a mapping of config overrides, got {value!r}")
    value = dict(value)
    presets = value.pop("presets", [])
    if isinstance(presets, str):
        presets = [presets]
    if not isinstance(presets, list) or not all(isinstance(p, str) for p in presets):
        raise ConfigError(f"grid {where}.presets: expected a preset name or a list of them")
    tags = value.pop("tags", {})
    if not isinstance(tags, dict):
        raise ConfigError(f"grid {where}.tags: expected a mapping of column -> value")
    try:
        emulate = EmulateSpec.model_validate(value.pop("emulate", {}))
    except ValidationError as exc:
        raise ConfigError(_grid_error(exc).replace("grid key '", f"grid key '{where}.emulate.", 1)) from None
    return Level(axis, str(label), tuple(presets), tuple(_flatten(value)), tuple(tags.items()),
                 tuple((k, v) for k, v in emulate.model_dump().items() if v))


def axis_levels(axis: str, spec: Any) -> list[Level]:
    where = f"axes.{axis}"
    if isinstance(spec, list):
        if axis not in KNOWN_AXES and "." not in axis:
            raise ConfigError(f"grid key '{where}' is unknown (known axes: {', '.join(KNOWN_AXES)}; "
                              f"or a dotted config key; or a mapping label -> overrides)")
        levels = [_plain_level(axis, v, f"{where}[{i}]") for i, v in enumerate(spec)]
    elif isinstance(spec, dict):
        levels = [_mapping_level(axis, k, v, f"{where}.{k}") for k, v in spec.items()]
    else:
        raise ConfigError(f"grid key '{where}': expected a list of values or a mapping label -> overrides")
    if not levels:
        raise ConfigError(f"grid key '{where}' has no values")
    labels = [lv.label for lv in levels]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ConfigError(f"grid key '{where}': value {sorted(dup)[0]!r} appears twice")
    return levels


# =============================================================================== planning
def resolve_preset(name: str, grid_dir: Path | None = None) -> Path:
    """A preset name (``massive``) or a YAML file (relative to the grid file, then the cwd)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or "/" in name:
        for cand in ([grid_dir / p] if grid_dir and not p.is_absolute() else []) + [p]:
            if cand.exists():
                return cand
        raise ConfigError(f"config file {name} does not exist")
    preset = CONFIG_DIR / f"{name}.yaml"
    if not preset.exists():
        names = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no preset named {name!r} (presets: {names})")
    return preset


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


@dataclass
class Cell:
    index: int
    levels: list[Level]

    @property
    def id(self) -> str:
        if not self.levels:
            return "base"
        return "__".join(f"{_slug(lv.axis)}={_slug(lv.label)}" for lv in self.levels)

    @property
    def labels(self) -> dict[str, str]:
        return {lv.axis: lv.label for lv in self.levels}

    @property
    def tags(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for lv in self.levels:
            out.update(dict(lv.tags))
        return out


@dataclass
class Task:
    """One cell and seed: everything a worker needs (picklable)."""

    cell_id: str
    cell_index: int
    seed: int
    config: dict
    config_hash: str
    out_dir: str
    engine: str
    leakage: dict
    labels: dict[str, str]
    tags: dict[str, Any]
    keep_captures: bool
    keep_checkpoints: bool
    timeout_s: float
    emulate: dict = field(default_factory=dict)


@dataclass
class Study:
    grid: GridSpec
    path: Path | None
    axes: dict[str, list[Level]]
    cells: list[Cell]
    tag_names: list[str] = field(default_factory=list)

    @property
    def axis_names(self) -> list[str]:
        return list(self.axes)

    def config_for(self, cell: Cell, seed: int) -> RunConfig:
        g = self.grid
        grid_dir = self.path.parent if self.path else None
        paths = [CONFIG_DIR / "default.yaml"] + [resolve_preset(p, grid_dir) for p in g.base.presets]
        for lv in cell.levels:
            paths += [resolve_preset(p, grid_dir) for p in lv.presets]
        overrides: list[tuple[str, Any]] = list(_flatten(g.base.set))
        if g.rounds is not None:
            overrides.append(("rounds", g.rounds))
        for lv in cell.levels:
            overrides += list(lv.overrides)
        overrides += [("seed", seed), ("run_id", STUDY_RUN_ID)]
        try:
            return build_config([read_yaml(p) for p in paths], overrides, use_env=False)
        except ConfigError as exc:
            where = ", ".join(f"axes.{lv.axis}.{lv.label}" for lv in cell.levels) or "base"
            raise ConfigError(f"grid cell {cell.id} ({where}): {exc}") from None

    def tasks(self, out: Path, engine: str | None = None) -> list[Task]:
        g = self.grid
        eng = engine or g.engine
        grid_emulate = {k: v for k, v in g.emulate.model_dump().items() if v}
        leak = g.leakage.model_dump()
        out_tasks = []
        for cell in self.cells:
            emulate = grid_emulate | {k: v for lv in cell.levels for k, v in lv.emulate}
            if emulate and eng != "inprocess":
                raise ConfigError(f"grid: emulate.{next(iter(emulate))} works with the in-process engine only")
            for seed in g.seeds:
                cfg = self.config_for(cell, seed)
                cfg_json = cfg.model_dump(mode="json")
                ident = {"config": cfg_json, "leakage": leak, "engine": eng} | ({"emulate": emulate} if emulate else {})
                h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
                out_tasks.append(Task(
                    cell.id, cell.index, seed, cfg_json, h, str(out / "cells" / cell.id / f"seed-{seed}"), eng, leak,
                    cell.labels, cell.tags, g.output.keep_captures, g.output.keep_checkpoints, g.timeout_s,
                    emulate,
                ))
        return out_tasks


def _check_metric_names(grid: GridSpec, axis_names: list[str], tag_names: list[str]) -> None:
    known = set(_metric_list(grid.output.accuracy_targets, grid.output.reference is not None))
    ref = grid.output.reference
    if ref is not None and ref.axis not in axis_names:
        raise ConfigError(f"grid key 'output.reference.axis': {ref.axis!r} is not an axis of this grid")
    groupable = set(axis_names) | set(tag_names)
    for i, t in enumerate(grid.output.tables):
        if t.metric not in known:
            raise ConfigError(f"grid key 'output.tables[{i}].metric': unknown metric {t.metric!r} "
                              f"(one of: {', '.join(sorted(known))})")
        for a in [*t.rows, *([t.cols] if t.cols else []), *t.where]:
            if a not in groupable:
                raise ConfigError(f"grid key 'output.tables[{i}]': {a!r} is not an axis or tag of this grid")
    for i, h in enumerate(grid.output.heatmaps):
        if h.metric not in known:
            raise ConfigError(f"grid key 'output.heatmaps[{i}].metric': unknown metric {h.metric!r}")
        for a in (h.rows, h.cols, *h.where):
            if a not in groupable:
                raise ConfigError(f"grid key 'output.heatmaps[{i}]': {a!r} is not an axis or tag of this grid")


def _check_attacks(methods: list[str]) -> None:
    if not methods:
        return
    names = set(KNOWN_ATTACKS)
    try:
        from attacks.base import available

        names |= set(available())
    except Exception:  # an attack module that does not import yet: the known names still hold
        pass
    for m in methods:
        if m not in names:
            raise ConfigError(f"grid key 'leakage.methods': unknown attack {m!r} (one of: {', '.join(sorted(names))})")


def plan_study(data: dict, path: Path | None = None) -> Study:
    """Validate a grid (already parsed YAML) and expand its cells. Raises ConfigError."""
    try:
        grid = GridSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_grid_error(exc)) from None
    if len(set(grid.seeds)) != len(grid.seeds):
        raise ConfigError("grid key 'seeds' lists a seed twice")
    axes = {name: axis_levels(name, spec) for name, spec in grid.axes.items()}
    cells = [Cell(i, list(combo)) for i, combo in enumerate(itertools.product(*axes.values()))] if axes \
        else [Cell(0, [])]
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise ConfigError("grid: two cells get the same id; make the axis labels distinct")
    tag_names: list[str] = []
    for levels in axes.values():
        for lv in levels:
            for k, _ in lv.tags:
                if k not in tag_names:
                    tag_names.append(k)
    reserved = set(ROW_FIXED) | set(METRICS) | set(ROW_EXTRA) | {"ref_accuracy", "labels_to_ref"}
    bad = sorted((set(axes) & reserved) | {t for t in tag_names if t.startswith("labels_at_")})
    if bad:
        raise ConfigError(f"grid key 'axes.{bad[0]}': the name is taken by a result column; rename the axis")
    clash = set(tag_names) & (set(axes) | reserved)
    if clash:
        raise ConfigError(f"grid: tag {sorted(clash)[0]!r} clashes with an axis or a result column")
    _check_metric_names(grid, list(axes), tag_names)
    ref = grid.output.reference
    if ref is not None and ref.level not in [lv.label for lv in axes[ref.axis]]:
        raise ConfigError(f"grid key 'output.reference.level': {ref.level!r} is not a value of axis {ref.axis!r}")
    _check_attacks(grid.leakage.methods)
    study = Study(grid, path, axes, cells, tag_names)
    for cell in cells:  # every cell's config must validate before anything runs
        study.config_for(cell, grid.seeds[0])
    return study


def load_study(path: Path | str) -> Study:
    path = Path(path)
    return plan_study(read_yaml(path, kind="grid file"), path)


# =============================================================================== one cell
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _atomic_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False))
    os.replace(tmp, path)


def _round_rows(metrics: dict) -> list[dict]:
    keys = ("round", "accuracy", "loss", "labels_used", "bytes_up", "bytes_down", "edge_bytes_up", "edge_bytes_down",
            "updates")
    return [{k: r.get(k) for k in keys} for r in metrics.get("rounds", [])]


def _run_engine(task: Task, cfg: RunConfig, out: Path, capture: bool) -> dict:
    if task.engine == "network":
        from deploy.launcher import run as launch

        launch(cfg, out=str(out), engine="network", attack=capture, quiet=True, timeout=task.timeout_s)
        return json.loads((out / "metrics.json").read_text())
    from deploy.engine import InProcessEngine

    (out / "config.yaml").write_text(dump_config(cfg))
    engine = InProcessEngine(cfg, out, capture=capture)
    if task.emulate.get("warm_start_at_fogs"):
        _warm_start_at_fogs(engine)
    engine.run(progress=False)
    engine.cloud.write_metrics()
    doc = engine.cloud.metrics_document()
    doc["acquired_label_counts"] = _acquired_label_counts(engine, cfg.rounds)
    return doc


def _acquired_label_counts(engine, rounds: int) -> list[list[int]]:
    """Per round, how many samples of each class the edges acquired (summed over fogs)."""
    import numpy as np

    k = engine.cloud.ds.num_classes
    out = []
    for r in range(1, rounds + 1):
        counts = np.zeros(k, dtype=np.int64)
        for fog in engine.fogs.values():
            _, y = type(fog.pool).arrays(fog.pool, r)  # the class's method: bypasses the what-if wrapper
            counts += np.bincount(y, minlength=k)[:k]
        out.append(counts.tolist())
    return out


def _warm_start_at_fogs(engine) -> None:
    """What-if: every fog trains on the cloud's warm-start samples plus its pool (as if the labelled
    seed set were shipped to the fogs). Wraps each fog pool's ``arrays``; only the training set
    changes (ground truth written for captures then includes the seed set too)."""
    import numpy as np

    idx = engine.cloud.splits.warm
    wx, wy = engine.cloud.ds.x[idx], engine.cloud.ds.y[idx]
    for fog in engine.fogs.values():
        original = fog.pool.arrays

        def arrays(round_=None, _original=original):
            x, y = _original(round_)
            if not len(y):
                return x, y
            return np.concatenate([wx, x]), np.concatenate([wy, y])

        fog.pool.arrays = arrays


def _get_attack(name: str, options: dict):
    """``attacks.base.get_attack``, but an attack module that fails to import only loses its own
    attacks (the registry loads every module at once)."""
    import importlib

    from attacks import base

    try:
        return base.get_attack(name, **options)
    except ImportError:
        for mod in ("analytic", "gradient_matching", "mkor"):
            try:
                importlib.import_module(f"attacks.{mod}")
            except ImportError:
                pass
        if name not in base.REGISTRY:
            raise base.AttackError(f"attack {name!r} is not available (its module does not import)") from None
        return base.REGISTRY[name](**options)


def _leakage(captures: Path, spec: dict, dataset: str) -> dict:
    """Attack up to ``captures_per_cell`` captures of the asked rounds with every method; keep
    the best method per capture (most recovered at >= 30 dB, then best mean PSNR, as
    ``attacks.cli.best_of``); average over the attacked captures. Relative leakage is against the
    dataset's mean image for built-in datasets."""
    from attacks.base import AttackError
    from attacks.scoring import score
    from protos.capture import read_capture, read_truth, truth_path

    prior = dataset if dataset in ("digits", "mnist5k") else None
    paths = sorted(captures.glob("*.fcap"))
    rounds = set(spec["rounds"])
    chosen = []
    for p in paths:
        try:
            rnd = int(p.name[1:5])
        except ValueError:
            continue
        if not rounds or rnd in rounds:
            chosen.append(p)
    chosen = chosen[: spec["captures_per_cell"]]
    per: list[dict] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    for p in chosen:
        cap = read_capture(p)
        tx, ty = read_truth(truth_path(p))
        best: tuple | None = None
        by_method: dict[str, dict] = {}
        for m in spec["methods"]:
            try:
                rec = _get_attack(m, spec["options"].get(m, {})).reconstruct(cap)
                s = score(rec.x, rec.y, tx, ty, prior=prior)
            except AttackError as exc:
                notes.append(f"{m} does not apply: {exc}")
                continue
            except Exception as exc:  # an attack that crashes must not sink the cell
                notes.append(f"{m} failed: {_one_line(exc)}")
                continue
            by_method[m] = {k: s.get(k) for k in ("psnr_mean", "ssim_mean", "recovered", "label_acc")} | {
                "seconds": rec.stats.get("seconds")}
            key = (s["recovered"], s["psnr_mean"] or 0.0)
            if best is None or key > best[0]:
                best = (key, m, s)
        if best is None:
            continue
        _, method, s = best
        per.append({"capture": p.name, "method": method, "batch": int(s["num_truth"]), "by_method": by_method,
                    **{k: s.get(k) for k in ("psnr_mean", "psnr_max", "ssim_mean", "ssim_max", "success_rate",
                                             "label_acc", "recovered", "relative_leakage_max")}})
    out: dict[str, Any] = {"attacked": len(per), "candidates": len(chosen), "per_capture": per,
                           "notes": sorted(set(notes)), "seconds": time.perf_counter() - t0}
    if per:
        def mean(k: str) -> float | None:
            vals = [c[k] for c in per if c[k] is not None]
            return sum(vals) / len(vals) if vals else None

        methods = [c["method"] for c in per]
        out.update(method=max(sorted(set(methods)), key=methods.count), batch=mean("batch"),
                   psnr_mean=mean("psnr_mean"), psnr_max=max(c["psnr_max"] or 0.0 for c in per),
                   ssim_mean=mean("ssim_mean"), ssim_max=max(c["ssim_max"] or 0.0 for c in per),
                   success_rate=mean("success_rate"), label_acc=mean("label_acc"),
                   relative_leakage_max=mean("relative_leakage_max"))
    return out


def run_task(task: Task) -> dict:
    """Run one cell and seed into ``task.out_dir``; write ``result.json`` last. Never raises for a
    failure inside the cell: the result says ``failed`` with a one-line reason."""
    out = Path(task.out_dir)
    if out.exists():
        shutil.rmtree(out)  # a half-finished attempt: start it afresh
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"cell": task.cell_id, "seed": task.seed, "status": "ok", "reason": "",
                           "config_hash": task.config_hash, "axes": task.labels, "tags": task.tags,
                           "engine": task.engine}
    handler = logging.FileHandler(out / "run.log")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        cfg = RunConfig.model_validate(task.config)
        capture = bool(task.leakage["methods"]) or task.keep_captures
        metrics = _run_engine(task, cfg, out, capture)
        rounds = _round_rows(metrics)
        doc.update(dataset=cfg.data.dataset, rounds=len(rounds), initial_accuracy=metrics.get("initial_accuracy"),
                   per_round=rounds, acquired_label_counts=metrics.get("acquired_label_counts"))
        if task.leakage["methods"]:
            doc["leakage"] = _leakage(out / "captures", task.leakage, cfg.data.dataset)
    except Exception as exc:
        doc.update(status="failed", reason=_one_line(exc))
        (out / "error.log").write_text(traceback.format_exc())
        log.warning("cell %s seed %d failed: %s", task.cell_id, task.seed, doc["reason"])
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    if not task.keep_captures:
        shutil.rmtree(out / "captures", ignore_errors=True)
        shutil.rmtree(out / "leakage", ignore_errors=True)
    if not task.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "state", ignore_errors=True)
    doc["timing"] = {"wall_s": time.perf_counter() - t0,
                     "attack_s": (doc.get("leakage") or {}).get("seconds", 0.0)}
    doc["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _atomic_json(out / RESULT_FILE, doc)
    return doc


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    for name in _TIER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def finished_result(task: Task) -> dict | None:
    """The stored result of a task, if it finished ``ok`` with the same config."""
    path = Path(task.out_dir) / RESULT_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("status") != "ok" or doc.get("config_hash") != task.config_hash:
        return None
    return doc


# =============================================================================== tables
ROW_FIXED = ("cell", "seed", "status", "reason")
ROW_EXTRA = ("dataset", "engine", "rounds_done", "accuracy_rounds", "labels_rounds")
METRICS = (
    "initial_accuracy", "final_accuracy", "best_accuracy", "min_accuracy", "final_loss", "labels_used", "bytes_up", "bytes_down",
    "edge_bytes_up", "edge_bytes_down", "updates", "r1_top_class_share",
    "leak_method", "leak_captures", "leak_batch", "leak_psnr_mean", "leak_psnr_max", "leak_ssim_mean",
    "leak_ssim_max", "leak_success_rate", "leak_label_acc", "leak_relative_max",
)
_NON_NUMERIC = {"leak_method"}


def result_row(doc: dict, axis_names: Sequence[str], tag_names: Sequence[str], targets: Sequence[float]) -> dict:
    row: dict[str, Any] = {k: doc.get(k, "") for k in ROW_FIXED}
    for a in axis_names:
        row[a] = doc.get("axes", {}).get(a, "")
    for t in tag_names:
        row[t] = doc.get("tags", {}).get(t, "")
    row["dataset"] = doc.get("dataset", "")
    row["engine"] = doc.get("engine", "")
    row["rounds_done"] = doc.get("rounds", "")
    rounds = doc.get("per_round") or []
    for m in METRICS:
        row[m] = None
    if rounds:
        last = rounds[-1]
        row.update(initial_accuracy=doc.get("initial_accuracy"), final_accuracy=last["accuracy"],
                   best_accuracy=max(r["accuracy"] for r in rounds),
                   min_accuracy=min(r["accuracy"] for r in rounds), final_loss=last["loss"],
                   labels_used=last["labels_used"],
                   bytes_up=sum(r["bytes_up"] for r in rounds), bytes_down=sum(r["bytes_down"] for r in rounds),
                   edge_bytes_up=sum(r["edge_bytes_up"] or 0 for r in rounds),
                   edge_bytes_down=sum(r["edge_bytes_down"] or 0 for r in rounds),
                   updates=sum(r["updates"] for r in rounds))
    counts = doc.get("acquired_label_counts") or []
    if counts and sum(counts[0]):
        row["r1_top_class_share"] = max(counts[0]) / sum(counts[0])
    leak = doc.get("leakage") or {}
    if leak:
        row["leak_captures"] = leak.get("attacked", 0)
        if leak.get("attacked"):
            row.update(leak_method=leak["method"], leak_batch=leak["batch"], leak_psnr_mean=leak["psnr_mean"],
                       leak_psnr_max=leak["psnr_max"], leak_ssim_mean=leak["ssim_mean"],
                       leak_ssim_max=leak["ssim_max"], leak_success_rate=leak["success_rate"],
                       leak_label_acc=leak["label_acc"], leak_relative_max=leak["relative_leakage_max"])
    init = doc.get("initial_accuracy")
    for t in targets:
        hit = next((r["labels_used"] for r in rounds if r["accuracy"] >= t), None)
        row[f"labels_at_{t:g}"] = 0 if rounds and init is not None and init >= t else hit
    row["_acc"] = [r["accuracy"] for r in rounds]
    row["_lab"] = [r["labels_used"] for r in rounds]
    row["accuracy_rounds"] = ";".join(_fmt(r["accuracy"]) for r in rounds)
    row["labels_rounds"] = ";".join(str(r["labels_used"]) for r in rounds)
    if leak.get("notes") and not leak.get("attacked") and not row["reason"]:
        row["reason"] = "no leakage: " + leak["notes"][0]
    return row


def _is_reach(metric: str) -> bool:
    """Metrics that are None when a run never reaches the target (tables say how many did)."""
    return metric.startswith("labels_at_") or metric == "labels_to_ref"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return str(v)


def write_csv(path: Path, rows: list[dict], columns: Sequence[str] | None = None) -> None:
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in columns])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def _num(v: Any) -> float | None:
    if v is None or v == "" or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    xs = [x for x in (_num(v) for v in values) if x is not None]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return m, sd, len(xs)


def summarize(rows: list[dict], group_cols: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """Mean and (sample) std over the ok rows of each group, groups in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(c, "") for c in group_cols), []).append(r)
    out = []
    for key, members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        s: dict[str, Any] = dict(zip(group_cols, key, strict=True))
        s["seeds"] = len(members)
        s["failed"] = len(members) - len(ok)
        for m in metrics:
            if m in _NON_NUMERIC:
                vals = [r.get(m) for r in ok if r.get(m)]
                s[m] = max(sorted(set(vals)), key=vals.count) if vals else None
                continue
            mu, sd, n = mean_std(r.get(m) for r in ok)
            s[f"{m}_mean"], s[f"{m}_std"] = mu, sd
            if _is_reach(m):
                s[f"{m}_reached"] = n
        out.append(s)
    return out


def _metric_list(targets: Sequence[float], reference: bool = False) -> list[str]:
    return list(METRICS) + [f"labels_at_{t:g}" for t in targets] + (["ref_accuracy", "labels_to_ref"] if reference else [])


def add_reference(rows: list[dict], axis_names: Sequence[str], ref: ReferenceSpec) -> None:
    """``ref_accuracy``: mean final accuracy (over seeds) of the reference level of ``ref.axis`` with
    every other axis equal; ``labels_to_ref``: labels used when the run first reaches it (0 when
    the warm-started model already does; None when it never does)."""
    others = [a for a in axis_names if a != ref.axis]
    finals: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("status") == "ok" and str(r.get(ref.axis)) == ref.level and r.get("final_accuracy") is not None:
            finals.setdefault(tuple(str(r[a]) for a in others), []).append(r["final_accuracy"])
    for r in rows:
        accs = finals.get(tuple(str(r[a]) for a in others))
        r["ref_accuracy"] = r["labels_to_ref"] = None
        if not accs or r.get("status") != "ok":
            continue
        target = sum(accs) / len(accs)
        r["ref_accuracy"] = target
        if _num(r.get("initial_accuracy")) is not None and r["initial_accuracy"] >= target - 1e-9:
            r["labels_to_ref"] = 0  # the warm-started model is already there
            continue
        r["labels_to_ref"] = next((lab for acc, lab in zip(r["_acc"], r["_lab"], strict=True) if acc >= target - 1e-9),
                                  None)


def _filter(rows: list[dict], where: dict[str, str]) -> list[dict]:
    return [r for r in rows if all(str(r.get(k, "")) == str(v) for k, v in where.items())]


def _cell_text(mu: float | None, sd: float | None, fmt: str, std: bool, n: int, total: int, metric: str) -> str:
    if mu is None:
        return "—"
    text = format(mu, fmt)
    if std and sd is not None:
        text += f" ± {format(sd, fmt)}"
    if _is_reach(metric) and n < total:
        text += f" ({n}/{total})"
    return text


def render_table(rows: list[dict], spec: TableSpec) -> str:
    """A Markdown pivot table: ``rows`` axes down, ``cols`` axis across, mean ± std of ``metric``
    over seeds (and over any axis not named). ``labels_at_*`` cells say how many runs reached it."""
    rows = [r for r in _filter(rows, spec.where) if r.get("status") == "ok"]
    col_vals: list[str] = []
    if spec.cols:
        for r in rows:
            if str(r[spec.cols]) not in col_vals:
                col_vals.append(str(r[spec.cols]))
    row_keys: list[tuple] = []
    for r in rows:
        k = tuple(str(r[a]) for a in spec.rows)
        if k not in row_keys:
            row_keys.append(k)
    head = list(spec.rows) + ([f"{spec.cols}={c}" for c in col_vals] if spec.cols else [spec.metric])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(spec.rows) + ["---:"] * (len(head) - len(spec.rows))) + "|"]
    for k in row_keys:
        members = [r for r in rows if tuple(str(r[a]) for a in spec.rows) == k]
        cells = []
        for c in (col_vals if spec.cols else [None]):
            sel = members if c is None else [r for r in members if str(r[spec.cols]) == c]
            mu, sd, n = mean_std(r.get(spec.metric) for r in sel)
            cells.append(_cell_text(mu, sd, spec.format, spec.std, n, len(sel), spec.metric))
        lines.append("| " + " | ".join(list(k) + cells) + " |")
    return "\n".join(lines)


def default_table(study: Study) -> TableSpec:
    return TableSpec(title="Final accuracy (mean ± std over seeds)", rows=study.axis_names or ["cell"],
                     metric="final_accuracy")


def render_markdown(study: Study, rows: list[dict], command: str, info: dict | None = None) -> str:
    g = study.grid
    specs = list(g.output.tables) or [default_table(study)]
    parts = []
    for spec in specs:
        parts.append(f"**{spec.title}** — metric `{spec.metric}`, mean ± std over seeds {g.seeds}"
                     + (f", where {', '.join(f'{k}={v}' for k, v in spec.where.items())}" if spec.where else ""))
        parts.append("")
        parts.append(render_table(rows, spec))
        parts.append("")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        parts.append(f"{len(failed)} run(s) failed: " + "; ".join(f"{r['cell']} seed {r['seed']}: {r['reason']}"
                                                                   for r in failed[:5]))
        parts.append("")
    if info and info.get("invocations"):
        most = max(i["ran"] for i in info["invocations"])
        longest = [i for i in info["invocations"] if i["ran"] == most][-1]  # the latest of those
        parts.append(f"Compute: {info['runs']} runs ({info['cells']} cells × {len(g.seeds)} seeds, {info['engine']} "
                     f"engine); their wall times sum to {info['run_wall_s_sum'] / 60:.1f} min. The invocation that "
                     f"ran the most ({longest['ran']} runs, {longest['jobs']} job(s)) took {longest['wall_s'] / 60:.1f} "
                     f"min (load average at its end {longest['loadavg_at_end']} on {info['cpus']} CPUs).")
        parts.append("")
    parts.append(f"Regenerate: `{command}`")
    return "\n".join(parts).rstrip() + "\n"


def splice_markdown(path: Path, name: str, text: str) -> None:
    """Replace the block between ``<!-- study:NAME:begin -->`` and ``<!-- study:NAME:end -->`` in
    ``path``; write the whole file if it has no such block (or does not exist)."""
    begin, end = f"<!-- study:{name}:begin -->", f"<!-- study:{name}:end -->"
    block = f"{begin}\n{text}{end}"
    if path.exists():
        old = path.read_text()
        i, j = old.find(begin), old.find(end)
        if i >= 0 and j > i:
            path.write_text(old[:i] + block + old[j + len(end):])
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block + "\n")


# =============================================================================== plots and report
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(study: Study, results: list[dict], keys: Sequence[str]) -> dict[tuple, dict]:
    """Mean accuracy-vs-labels curve per group (over seeds and unnamed axes), starting at
    (0 labels, initial accuracy)."""
    groups: dict[tuple, list[dict]] = {}
    for d in results:
        if d.get("status") != "ok" or not d.get("per_round"):
            continue
        groups.setdefault(tuple(d["axes"].get(k, "") for k in keys), []).append(d)
    out = {}
    for k, docs in groups.items():
        n = min(len(d["per_round"]) for d in docs)
        acc = [[d["initial_accuracy"]] + [r["accuracy"] for r in d["per_round"][:n]] for d in docs]
        lab = [[0] + [r["labels_used"] for r in d["per_round"][:n]] for d in docs]
        cols = list(zip(*acc, strict=True))
        out[k] = {"labels": [sum(c) / len(c) for c in zip(*lab, strict=True)],
                  "acc": [sum(c) / len(c) for c in cols],
                  "std": [mean_std(c)[1] or 0.0 for c in cols]}
    return out


def plot_accuracy_vs_labels(study: Study, results: list[dict], path: Path) -> Path | None:
    axes = study.axis_names
    color = "sampling" if "sampling" in axes else (axes[0] if axes else None)
    facet_axes = [a for a in axes if a != color]
    curves = _curves(study, results, ([color] if color else []) + facet_axes)
    if not curves:
        return None
    facets: list[tuple] = []
    for k in curves:
        if k[1:] not in facets:
            facets.append(k[1:])
    if len(facets) > 16:
        log.info("accuracy-vs-labels: %d facets, plotting the first 16", len(facets))
        facets = facets[:16]
    plt = _plt()
    ncols = min(4, len(facets))
    nrows = math.ceil(len(facets) / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), dpi=100, squeeze=False)
    levels = [lv.label for lv in study.axes[color]] if color else [""]
    cmap = plt.get_cmap("tab10")
    for fi, facet in enumerate(facets):
        ax = axs[fi // ncols][fi % ncols]
        for li, lv in enumerate(levels):
            c = curves.get((lv, *facet)) if color else curves.get(facet)
            if c is None:
                continue
            lo = [a - s for a, s in zip(c["acc"], c["std"], strict=True)]
            hi = [a + s for a, s in zip(c["acc"], c["std"], strict=True)]
            ax.plot(c["labels"], c["acc"], "o-", ms=2.5, lw=1.2, color=cmap(li % 10), label=lv)
            ax.fill_between(c["labels"], lo, hi, color=cmap(li % 10), alpha=0.15, lw=0)
        ax.set_title(", ".join(f"{a}={v}" for a, v in zip(facet_axes, facet, strict=True)) or study.grid.name,
                     fontsize=8)
        ax.set_xlabel("labels used at the edges", fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if fi == 0:
            ax.legend(fontsize=7, title=color, title_fontsize=7)
    for fi in range(len(facets), nrows * ncols):
        axs[fi // ncols][fi % ncols].axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_heatmap(rows: list[dict], r_axis: str, c_axis: str, metrics: Sequence[str], path: Path,
                 title: str = "", where: dict | None = None) -> Path | None:
    rows = [r for r in _filter(rows, where or {}) if r.get("status") == "ok"]
    r_vals = list(dict.fromkeys(str(r[r_axis]) for r in rows))
    c_vals = list(dict.fromkeys(str(r[c_axis]) for r in rows))
    if not r_vals or not c_vals:
        return None
    plt = _plt()
    fig, axs = plt.subplots(1, len(metrics), figsize=(1.2 + 0.9 * len(c_vals) * len(metrics) + 1.2 * len(metrics),
                                                      1.2 + 0.45 * len(r_vals)), dpi=100, squeeze=False)
    for mi, m in enumerate(metrics):
        ax = axs[0][mi]
        grid = [[mean_std(r.get(m) for r in rows if str(r[r_axis]) == rv and str(r[c_axis]) == cv)[0]
                 for cv in c_vals] for rv in r_vals]
        vals = [[float("nan") if v is None else v for v in line] for line in grid]
        im = ax.imshow(vals, cmap="viridis", aspect="auto")
        finite = [v for line in grid for v in line if v is not None]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                light = v is not None and hi > lo and (v - lo) / (hi - lo) > 0.6  # viridis is light at the top
                ax.text(j, i, "—" if v is None else f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="k" if light else "w")
        ax.set_xticks(range(len(c_vals)), c_vals, fontsize=7, rotation=30)
        ax.set_yticks(range(len(r_vals)), r_vals, fontsize=7)
        ax.set_xlabel(c_axis, fontsize=8)
        ax.set_ylabel(r_axis, fontsize=8)
        ax.set_title(m, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_tradeoff(study: Study, rows: list[dict], path: Path) -> Path | None:
    """Final accuracy against leakage (mean SSIM / PSNR of the best attack): colour = defense,
    marker = the combination of the other axes (one point per cell, mean ± std over seeds)."""
    ok = [r for r in rows if r.get("status") == "ok" and _num(r.get("leak_ssim_mean")) is not None]
    if not ok:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    others = [a for a in study.axis_names if a != "defense"]
    combos = list(dict.fromkeys(tuple(str(r[a]) for a in others) for r in ok))
    markers = "osD^vP*Xh<>"
    fig, axs = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    cmap = plt.get_cmap("tab10")
    defenses = [lv.label for lv in study.axes["defense"]]
    for li, dname in enumerate(defenses):
        for ci, combo in enumerate(combos):
            sel = [r for r in ok if r["defense"] == dname and tuple(str(r[a]) for a in others) == combo]
            if not sel:
                continue
            acc_m, acc_s, _ = mean_std(r["final_accuracy"] for r in sel)
            for ax, metric in zip(axs, ("leak_ssim_mean", "leak_psnr_mean"), strict=True):
                mu, sd, _ = mean_std(r.get(metric) for r in sel)
                if mu is None:
                    continue
                ax.errorbar(mu, acc_m, xerr=sd or 0, yerr=acc_s or 0, fmt=markers[ci % len(markers)],
                            color=cmap(li % 10), capsize=2, ms=5, elinewidth=0.8, alpha=0.9)
    for ax, metric in zip(axs, ("leakage: mean SSIM (best attack)", "leakage: mean PSNR dB (best attack)"),
                          strict=True):
        ax.set_xlabel(metric, fontsize=8)
        ax.set_ylabel("final test accuracy", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    handles = [Line2D([], [], color=cmap(i % 10), marker="o", ls="", label=d) for i, d in enumerate(defenses)]
    if others:
        handles += [Line2D([], [], color="k", mfc="none", marker=markers[i % len(markers)], ls="",
                           label=", ".join(f"{a}={v}" for a, v in zip(others, c, strict=True)))
                    for i, c in enumerate(combos)]
    fig.legend(handles=handles, fontsize=7, loc="center right", title="defense / other axes", title_fontsize=7)
    fig.suptitle(f"{study.grid.name}: accuracy–leakage trade-off (mean ± std over seeds)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def make_plots(study: Study, results: list[dict], rows: list[dict], out: Path) -> list[tuple[str, Path]]:
    d = out / "plots"
    d.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, Path]] = []
    leak = bool(study.grid.leakage.methods)
    p = plot_accuracy_vs_labels(study, results, d / "accuracy_vs_labels.png")
    if p:
        made.append(("Accuracy vs labels used (mean ± std over seeds)", p))
    axes = study.axis_names
    if leak and "sampling" in axes and "heterogeneity" in axes:
        p = plot_heatmap(rows, "sampling", "heterogeneity", ["leak_psnr_mean", "leak_ssim_mean", "leak_success_rate"],
                         d / "leakage_heatmap.png", title="Leakage (best attack) by sampling × heterogeneity")
        if p:
            made.append(("Leakage: sampling × heterogeneity", p))
    if leak and "defense" in axes:
        p = plot_tradeoff(study, rows, d / "tradeoff.png")
        if p:
            made.append(("Accuracy–leakage trade-off under defenses", p))
    for i, h in enumerate(study.grid.output.heatmaps):
        p = plot_heatmap(rows, h.rows, h.cols, [h.metric], d / f"heatmap-{i}.png", title=h.title, where=h.where)
        if p:
            made.append((h.title or f"{h.metric}: {h.rows} × {h.cols}", p))
    return made


def _html_table(rows: list[dict], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(study: Study, out: Path, summary: list[dict], plots: list[tuple[str, Path]],
                 markdown: str, info: dict) -> Path:
    g = study.grid
    show = list(study.axis_names) + study.tag_names + ["seeds", "failed"] + [
        c for c in ("final_accuracy_mean", "final_accuracy_std", "min_accuracy_mean", "labels_used_mean",
                    "ref_accuracy_mean", "labels_to_ref_mean", "labels_to_ref_reached", "bytes_up_mean",
                    "bytes_down_mean", "leak_method", "leak_psnr_mean_mean", "leak_ssim_mean_mean",
                    "leak_success_rate_mean", "leak_label_acc_mean")
        if (g.leakage.methods or not c.startswith("leak")) and (not summary or c in summary[0])]
    show += [c for c in (summary[0] if summary else {}) if c.startswith("labels_at_") and c.endswith("_mean")]
    imgs = []
    for title, p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        imgs.append(f"<h3>{html.escape(title)}</h3><img src='data:image/png;base64,{data}'>")
    grid_text = study.path.read_text() if study.path and study.path.exists() else yaml.safe_dump(g.model_dump())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>fogfl study: {html.escape(g.name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}
th{{background:#eee}}pre{{background:#f6f6f6;padding:1em;font-size:11px;overflow:auto}}img{{max-width:100%}}</style>
</head><body><h1>fogfl study: {html.escape(g.name)}</h1><p>{html.escape(g.description)}</p>
<p>{info['cells']} cells × {len(g.seeds)} seeds = {info['runs']} runs on the {html.escape(info['engine'])} engine;
{info['ok']} ok, {info['failed']} failed. This invocation ran {info['ran']} and reused {info['reused']}
in {info['wall_s']:.1f} s (load average at the end {html.escape(info['loadavg'])}, {info['cpus']} CPUs).</p>
<h2>Summary (mean and std over seeds)</h2>{_html_table(summary, show)}
<h2>Tables</h2><pre>{html.escape(markdown)}</pre>
<h2>Plots</h2>{''.join(imgs) or '<p>no plots</p>'}
<h2>Grid</h2><pre>{html.escape(grid_text)}</pre></body></html>"""
    path = out / "report.html"
    path.write_text(doc)
    return path


# =============================================================================== driver
@dataclass
class StudyOutcome:
    out: Path
    ran: list[str]
    reused: list[str]
    failed: list[str]
    pending: int
    wall_s: float
    rows: list[dict]


def _task_key(t: Task) -> str:
    return f"{t.cell_id}/seed-{t.seed}"


def run_study(study: Study, out: Path | str, *, engine: str | None = None, jobs: int = 1, max_cells: int | None = None,
              progress: bool = True, report_md: Path | str | None = None, command: str = "") -> StudyOutcome:
    """Run (or resume) a study into ``out`` and write its CSVs, plots and report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tasks = study.tasks(out, engine)
    done: dict[str, dict] = {}
    todo: list[Task] = []
    for t in tasks:
        doc = finished_result(t)
        if doc is not None:
            done[_task_key(t)] = doc
        else:
            todo.append(t)
    reused = list(done)
    if max_cells is not None:
        todo = todo[:max_cells]
    ran: list[str] = []
    levels = {n: logging.getLogger(n).level for n in _TIER_LOGGERS}
    for n in _TIER_LOGGERS:
        logging.getLogger(n).setLevel(logging.WARNING)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn(f"[bold]study {study.grid.name}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   disable=not progress)
    try:
        with bar:
            task_id = bar.add_task("cells", total=len(tasks), completed=len(reused), info="")

            def finished(t: Task, doc: dict) -> None:
                done[_task_key(t)] = doc
                ran.append(_task_key(t))
                status = "ok" if doc["status"] == "ok" else "[red]failed"
                bar.update(task_id, advance=1, info=f"{_task_key(t)} {status}")

            if jobs <= 1:
                import torch

                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    for t in todo:
                        bar.update(task_id, info=f"running {_task_key(t)}")
                        finished(t, run_task(t))
                finally:
                    torch.set_num_threads(threads)
            else:
                import multiprocessing as mp

                with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                            initializer=_worker_init) as pool:
                    futures = {pool.submit(run_task, t): t for t in todo}
                    try:
                        for fut in cf.as_completed(futures):
                            finished(futures[fut], fut.result())
                    except BaseException:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)
    wall = time.perf_counter() - t0
    return _write_outputs(study, out, tasks, done, ran, reused, wall, report_md, command, engine, jobs)


def _write_outputs(study: Study, out: Path, tasks: list[Task], done: dict[str, dict], ran: list[str],
                   reused: list[str], wall: float, report_md: Path | str | None, command: str,
                   engine: str | None, jobs: int = 1) -> StudyOutcome:
    g = study.grid
    targets = g.output.accuracy_targets
    results = [done[_task_key(t)] for t in tasks if _task_key(t) in done]  # grid order, then seed
    rows = [result_row(d, study.axis_names, study.tag_names, targets) for d in results]
    ref = g.output.reference
    if ref is not None:
        add_reference(rows, study.axis_names, ref)
    metric_cols = _metric_list(targets, ref is not None)
    columns = [*ROW_FIXED, *study.axis_names, *study.tag_names, "dataset", "engine", "rounds_done", *metric_cols,
               "accuracy_rounds", "labels_rounds"]
    write_csv(out / "results.csv", rows, columns)
    round_rows = []
    for d in results:
        for r in d.get("per_round") or []:
            round_rows.append({"cell": d["cell"], "seed": d["seed"], **{a: d["axes"].get(a, "") for a in study.axis_names},
                               **r})
    write_csv(out / "rounds.csv", round_rows,
              ["cell", "seed", *study.axis_names, "round", "accuracy", "loss", "labels_used", "bytes_up", "bytes_down",
               "edge_bytes_up", "edge_bytes_down", "updates"])
    group = ["cell", *study.axis_names, *study.tag_names]
    summary = summarize(rows, group, [m for m in metric_cols if m not in ("leak_method",)] + ["leak_method"])
    sum_cols = list(summary[0].keys()) if summary else group
    write_csv(out / "summary.csv", summary, sum_cols)
    write_csv(out / "timings.csv", [{"cell": d["cell"], "seed": d["seed"], "status": d["status"],
                                     "wall_s": d.get("timing", {}).get("wall_s"),
                                     "attack_s": d.get("timing", {}).get("attack_s"),
                                     "finished_at": d.get("finished_at", "")} for d in results],
              ["cell", "seed", "status", "wall_s", "attack_s", "finished_at"])
    failed = [_task_key(t) for t in tasks if done.get(_task_key(t), {}).get("status") == "failed"]
    pending = sum(1 for t in tasks if _task_key(t) not in done)
    cmd = command or f"fogfl study {study.path or 'GRID.yaml'} --out {out}"
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    try:
        prev = json.loads((out / "study.json").read_text())
        history = prev.get("invocations") or ([{"ran": prev["ran"], "reused": prev["reused"], "wall_s": prev["wall_s"],
                                                "jobs": 1, "loadavg_at_end": prev.get("loadavg", "?"),
                                                "finished_at": prev.get("finished_at", "")}] if "ran" in prev else [])
    except (OSError, ValueError, AttributeError, KeyError):
        history = []
    history.append({"ran": len(ran), "reused": len(reused), "wall_s": round(wall, 2), "jobs": jobs,
                    "loadavg_at_end": load, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    info = {"name": g.name, "cells": len(study.cells), "runs": len(tasks), "engine": engine or g.engine,
            "ok": len(results) - len(failed), "failed": len(failed), "pending": pending, "ran": len(ran),
            "reused": len(reused), "wall_s": wall, "loadavg": load, "cpus": os.cpu_count() or 0,
            "run_wall_s_sum": sum(d.get("timing", {}).get("wall_s", 0.0) for d in results),
            "ran_cells": ran, "reused_cells": reused, "failed_cells": failed,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "invocations": history}
    _atomic_json(out / "study.json", info)
    markdown = render_markdown(study, rows, cmd, info)
    (out / "tables.md").write_text(markdown)
    if report_md:
        splice_markdown(Path(report_md), g.name, markdown)
    plots: list[tuple[str, Path]] = []
    if g.output.plots and rows:
        try:
            plots = make_plots(study, results, rows, out)
        except Exception as exc:  # a plot must never lose the results
            log.warning("plots failed: %s", _one_line(exc))
    if g.output.report:
        write_report(study, out, summary, plots, markdown, info)
    if study.path and study.path.exists():
        shutil.copyfile(study.path, out / "grid.yaml")
    return StudyOutcome(out, ran, reused, failed, pending, wall, rows)


# =============================================================================== CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="grid file (YAML), e.g. deploy/studies/active-vs-random.yaml")
    p.add_argument("--out", "-o", help="study directory (default runs/study-<name>); rerun to resume")
    p.add_argument("--engine", choices=["inprocess", "network"], help="override the grid's engine")
    p.add_argument("--jobs", "-j", type=int, default=1, help="cells run in parallel (worker processes)")
    p.add_argument("--max-cells", type=int, metavar="N", help="run at most N unfinished cell-seeds, then stop")
    p.add_argument("--report-md", metavar="FILE",
                   help="write the study's tables as Markdown (replaces its <!-- study:NAME --> block if present)")
    p.add_argument("--plots-to", metavar="DIR", help="also copy the plots here as <study-name>-<plot>.png (e.g. docs/study)")
    p.add_argument("--list", action="store_true", help="list the cells and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(subparsers) -> None:
    """Register ``fogfl study`` on the CLI's subparsers."""
    p = subparsers.add_parser("study", help="run a grid of federations (resumable) and report accuracy and leakage")
    configure_parser(p)
    p.set_defaults(func=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    study = load_study(args.grid)
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    if args.max_cells is not None and args.max_cells < 0:
        raise ConfigError("--max-cells must be >= 0")
    if args.list:
        for c in study.cells:
            print(c.id)
        print(f"{len(study.cells)} cells × {len(study.grid.seeds)} seeds")
        return 0
    out = Path(args.out) if args.out else Path("runs") / f"study-{_slug(study.grid.name)}"
    cmd = " ".join(["fogfl study", str(args.grid), "--out", str(out)]
                   + (["--engine", args.engine] if args.engine else [])
                   + (["--report-md", str(args.report_md)] if args.report_md else [])
                   + (["--plots-to", str(args.plots_to)] if args.plots_to else []))
    res = run_study(study, out, engine=args.engine, jobs=args.jobs, max_cells=args.max_cells,
                    progress=not args.quiet, report_md=args.report_md, command=cmd)
    if args.plots_to:
        dest = Path(args.plots_to)
        dest.mkdir(parents=True, exist_ok=True)
        wanted = study.grid.output.publish_plots
        for png in sorted((out / "plots").glob("*.png")):
            if wanted is None or png.stem in wanted:
                shutil.copyfile(png, dest / f"{_slug(study.grid.name)}-{png.name}")
    print(f"study {study.grid.name}: ran {len(res.ran)}, reused {len(res.reused)}, failed {len(res.failed)}, "
          f"pending {res.pending}; {res.wall_s:.1f} s")
    print(f"results: {out / 'results.csv'}\nsummary: {out / 'summary.csv'}\nreport:  {out / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fogfl study", description="Run a grid of federations (resumable).")
    ap.add_argument("--log-level", default=os.environ.get("FOGFL_LOG_LEVEL", "WARNING"))
    configure_parser(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return cmd_study(args)
    except FogflError as exc:
        print(f"fogfl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fogfl: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
