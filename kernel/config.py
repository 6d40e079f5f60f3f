"""The run configuration: one pydantic schema for every tier, loaded from YAML, overridable by
``--set key=value`` (dotted keys) and by ``FOGFL_*`` environment variables (``FOGFL_CLOUD__PORT=5000``
sets ``cloud.port``). Unknown keys are errors. Numpy-free and torch-free."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernel.errors import ConfigError
from protos.control import AcquisitionConfig, TrainConfig
from protos.topics import check_id

ENV_PREFIX = "FOGFL_"
# FOGFL_* variables that are settings of the tools, not config keys
RESERVED_ENV = {"FOGFL_HOME", "FOGFL_LOG_LEVEL", "FOGFL_REQUIRE_MOSQUITTO"}


class _Strict(BaseModel):
    # coerce_numbers_to_str: `--set run_id=2024` or `path: 2024` reaches us as an int from YAML.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class DataConfig(_Strict):
    dataset: Literal["digits", "mnist5k", "mnist", "fashion-mnist", "cifar10", "folder", "npz"] = "digits"
    path: str | None = Field(None, description="local file or folder for mnist/fashion-mnist/cifar10/folder/npz")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    partition: Literal["iid", "dirichlet", "classes"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition=dirichlet)")
    class_split: list[list[int]] = Field(
        default_factory=lambda: [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]],
        description="classes per edge group (partition=classes); edge i gets group i mod len",
    )
    partition_level: Literal["edge", "fog"] = Field(
        "edge", description="partition over edges (each edge its own share), or over fogs (heterogeneity "
                            "between the federation's participants; a fog's share split iid over its edges)")
    max_samples: int = Field(0, ge=0, description="use at most this many samples (0 = all)")
    image_size: int = Field(0, ge=0, description="folder datasets: resize to this square size (0 = keep)")


class ModelConfig(_Strict):
    arch: Literal["mlp", "cnn", "lenet", "convfc", "fed2"] = "mlp"
    hidden: int = Field(128, ge=1, description="hidden units (mlp, convfc, cnn's FC)")
    channels: int = Field(16, ge=1, description="conv channels (cnn, convfc)")
    activation: Literal["relu", "sigmoid", "tanh", "leaky_relu"] = "relu"
    groups: int = Field(5, ge=1, description="fed2: class groups")


class TopologyConfig(_Strict):
    fogs: int = Field(2, ge=1)
    edges_per_fog: int = Field(3, ge=1)
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of fogs selected per round")


class WarmStartConfig(_Strict):
    per_class: int = Field(10, ge=0, description="labelled samples per class for the cloud's initial model")
    epochs: int = Field(30, ge=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(50, ge=1)


class CloudConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    strategy: Literal["fedavg", "fedprox", "fed2", "median", "trimmed_mean", "krum"] = "fedavg"
    trim_ratio: float = Field(0.2, ge=0, lt=0.5)
    krum_faulty: int = Field(2, ge=0)
    krum_multi: int = Field(1, ge=1, description="Multi-Krum: average the m best-scored updates (1 = Krum)")
    fed2_weighting: Literal["samples", "classes", "features"] = Field(
        "samples", description="Fed2 group averaging weights (see docs/strategies.md)")
    min_updates: int = Field(0, ge=0, description="updates needed to close a round (0 = all selected)")
    round_deadline_s: float = Field(60.0, gt=0)
    wait_for_fogs_s: float = Field(60.0, ge=0, description="wait this long for the fogs to come online")
    ask_ahead: int = Field(4, ge=0, description="requests for the next round's model the cloud holds at once "
                           "(each a gRPC thread); 0: none, fogs learn of rounds from the MQTT announcements")
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)


class DefenseConfig(_Strict):
    clip: float = Field(0.0, ge=0, description="L2 clipping norm of the update (0 = off)")
    noise_sigma: float = Field(0.0, ge=0, description="Gaussian noise std, relative to clip if clip>0")
    prune_ratio: float = Field(0.0, ge=0, lt=1, description="zero this fraction of smallest-magnitude entries")
    masking: bool = Field(False, description="secure-aggregation pairwise masks")
    mask_scale: float = Field(10.0, gt=0)


class MqttConfig(_Strict):
    host: str | None = Field(None, description="external broker host; None = start the embedded broker")
    port: int = Field(1883, ge=0, le=65535)
    keepalive: int = Field(30, ge=5)


class EdgeConfig(_Strict):
    threads: int = Field(
        1, ge=1, le=256, description="onnxruntime and BLAS threads an edge process uses for its queries: 1 "
                                     "suits many edges on one machine (the launcher, the tests); a device "
                                     "of its own (a Pi 4, a Jetson) can take its core count")
    durability: Literal["sync", "async"] = Field(
        "sync", description="edge outbox (with a state dir): 'sync' fsyncs each sample batch before it is "
                            "published (a power cut loses nothing); 'async' publishes first and fsyncs while "
                            "the batch is in flight (a process crash loses nothing; a power cut within those "
                            "milliseconds can lose a batch the broker did not get)")


class RunConfig(_Strict):
    run_id: str = "demo"
    seed: int = 0
    rounds: int = Field(10, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    acquisition: AcquisitionConfig = Field(default_factory=AcquisitionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cloud: CloudConfig = Field(default_factory=CloudConfig)
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    edge: EdgeConfig = Field(default_factory=EdgeConfig)

    @field_validator("run_id")
    @classmethod
    def _check_run_id(cls, v: str) -> str:
        # the run id becomes an MQTT topic level: fail here, not when the first topic is built
        return check_id("run", v)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if not self.run_id or any(c in self.run_id for c in "/+# "):
            raise ValueError("run_id must be non-empty without '/', '+', '#' or spaces")
        return self

    # ids are derived, so every process agrees on them
    def fog_ids(self) -> list[str]:
        return [f"fog-{i}" for i in range(self.topology.fogs)]

    def edge_ids(self, fog_id: str) -> list[str]:
        return [f"{fog_id}.edge-{j}" for j in range(self.topology.edges_per_fog)]

    def edge_index(self, edge_id: str) -> int:
        """Global index of an edge (its data partition), from its id."""
        try:
            fog_part, edge_part = edge_id.split(".edge-")
            fog = int(fog_part.removeprefix("fog-"))
            j = int(edge_part)
        except ValueError:
            raise ConfigError(f"edge id {edge_id!r} is not of the form fog-<i>.edge-<j>") from None
        if not (0 <= fog < self.topology.fogs and 0 <= j < self.topology.edges_per_fog):
            raise ConfigError(f"edge id {edge_id!r} is outside the topology "
                              f"({self.topology.fogs} fogs x {self.topology.edges_per_fog} edges)")
        return fog * self.topology.edges_per_fog + j

    def num_edges(self) -> int:
        return self.topology.fogs * self.topology.edges_per_fog


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{where}'"
    return f"config key '{where}': {err['msg']}"


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = [p for p in key.split(".") if p]
    if not parts:
        raise ConfigError(f"empty config key in override {key!r}")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{key}': '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. rounds=5)")
        k, v = item.split("=", 1)
        out.append((k.strip(), _parse_value(v)))
    return out


def env_overrides(environ: Mapping[str, str] | None = None) -> list[tuple[str, Any]]:
    environ = os.environ if environ is None else environ
    out = []
    for k, v in environ.items():
        if k.startswith(ENV_PREFIX) and k not in RESERVED_ENV:
            out.append((k[len(ENV_PREFIX):].lower().replace("__", "."), _parse_value(v)))
    return out


def read_yaml(path: Path | str, kind: str = "config file") -> dict:
    """A YAML mapping from ``path``; every failure is a one-line ConfigError naming the ``kind`` of file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{kind} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{kind} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{kind} {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{kind} {path}:{where} is not valid YAML") from None
    if data is None:  # an empty file (or only comments) is an empty layer
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {path} must hold a mapping at the top level")
    return data


def merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(
    layers: Iterable[Mapping] = (),
    overrides: Iterable[tuple[str, Any]] = (),
    use_env: bool = True,
) -> RunConfig:
    """Merge YAML layers in order, then env vars, then explicit overrides; validate."""
    tree: dict = {}
    for layer in layers:
        tree = merge(tree, layer)
    for k, v in (env_overrides() if use_env else []):
        _set_dotted(tree, k, v)
    for k, v in overrides:
        _set_dotted(tree, k, v)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def load_config(paths: Iterable[Path | str] = (), sets: Iterable[str] = (), use_env: bool = True) -> RunConfig:
    return build_config([read_yaml(p) for p in paths], parse_overrides(sets), use_env)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
