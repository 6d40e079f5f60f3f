"""The run configuration (kernel/config.py): defaults, strict keys, --set parsing, FOGFL_* env
vars and YAML layers, with one-line ConfigErrors."""

from __future__ import annotations

import pytest
import yaml

from kernel.config import (
    RunConfig,
    build_config,
    dump_config,
    env_overrides,
    load_config,
    parse_overrides,
    read_yaml,
)
from kernel.errors import ConfigError, FogflError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Tests see only the FOGFL_* variables they set themselves."""
    import os

    for k in list(os.environ):
        if k.startswith("FOGFL_"):
            monkeypatch.delenv(k)


def _err(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(**kw)
    msg = str(e.value)
    assert msg and "\n" not in msg, f"error message must be one line: {msg!r}"
    assert isinstance(e.value, FogflError)
    return msg


def _yaml(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- defaults, keys


def test_defaults_validate_and_survive_a_dump():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.run_id == "demo" and cfg.data.dataset == "digits" and cfg.cloud.port == 0
    again = build_config([yaml.safe_load(dump_config(cfg))], use_env=False)
    assert again == cfg


def test_ids_derived_from_the_topology():
    cfg = load_config(sets=["topology.fogs=2", "topology.edges_per_fog=3"])
    assert cfg.fog_ids() == ["fog-0", "fog-1"]
    edges = [e for f in cfg.fog_ids() for e in cfg.edge_ids(f)]
    assert [cfg.edge_index(e) for e in edges] == list(range(cfg.num_edges())) == list(range(6))
    for bad in ("fog-2.edge-0", "fog-0.edge-3", "edge-1", "fog-x.edge-0"):
        with pytest.raises(ConfigError):
            cfg.edge_index(bad)


@pytest.mark.parametrize(
    "sets, key",
    [
        (["bogus=1"], "bogus"),
        (["cloud.bogus=1"], "cloud.bogus"),
        (["cloud.warm_start.bogus=1"], "cloud.warm_start.bogus"),
        (["train.bogus=1"], "train.bogus"),
    ],
)
def test_unknown_key_is_named(sets, key):
    assert _err(sets=sets) == f"unknown config key '{key}'"


def test_unknown_key_in_yaml_and_env(tmp_path, monkeypatch):
    p = _yaml(tmp_path, "c.yaml", "rounds: 3\ndata:\n  datset: digits\n")
    assert _err(paths=[p]) == "unknown config key 'data.datset'"
    monkeypatch.setenv("FOGFL_MQTT__PROT", "1884")
    assert _err() == "unknown config key 'mqtt.prot'"


@pytest.mark.parametrize(
    "sets, key",
    [
        (["rounds=0"], "rounds"),
        (["rounds=abc"], "rounds"),
        (["topology.fraction=1.5"], "topology.fraction"),
        (["model.arch=resnet152"], "model.arch"),
        (["cloud.port=70000"], "cloud.port"),
        (["edge.threads=0"], "edge.threads"),
        (["data.class_split=[[0, 1], [x]]"], "data.class_split"),
        (["run_id=a/b"], "run_id"),
        (["run_id=has space"], "run_id"),
        (["run_id=a:b"], "run_id"),  # passes '/+# ' but is no valid topic level
        (["cloud=5"], "cloud"),
    ],
)
def test_bad_value_names_the_key(sets, key):
    msg = _err(sets=sets)
    assert msg.startswith(f"config key '{key}"), msg


# --------------------------------------------------------------------------- --set


def test_set_parses_yaml_scalars_and_lists():
    assert parse_overrides(["rounds=5", "train.lr=0.01", "defense.masking=true", "model.arch=cnn",
                            "data.class_split=[[0,1],[2,3]]", "note=a=b", " seed = 3"]) == [
        ("rounds", 5), ("train.lr", 0.01), ("defense.masking", True), ("model.arch", "cnn"),
        ("data.class_split", [[0, 1], [2, 3]]), ("note", "a=b"), ("seed", 3),
    ]
    cfg = load_config(sets=["rounds=5", "train.lr=1e-3", "defense.masking=yes", "train.shuffle=false",
                            "data.class_split=[[0,1],[2,3,4]]", "model.arch=cnn", "mqtt.host=10.0.0.1",
                            "run_id=2024", "data.path=", "cloud.warm_start.per_class=4"])
    assert cfg.rounds == 5 and isinstance(cfg.rounds, int)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.defense.masking is True and cfg.train.shuffle is False
    assert cfg.data.class_split == [[0, 1], [2, 3, 4]]
    assert cfg.model.arch == "cnn" and cfg.mqtt.host == "10.0.0.1"
    assert cfg.run_id == "2024"  # a numeric-looking id stays a string
    assert cfg.data.path is None
    assert cfg.cloud.warm_start.per_class == 4


def test_later_set_wins_and_sections_merge():
    cfg = load_config(sets=["cloud.port=1", "cloud.port=2", "cloud.strategy=median"])
    assert cfg.cloud.port == 2 and cfg.cloud.strategy == "median"
    assert cfg.cloud.warm_start.per_class == RunConfig().cloud.warm_start.per_class


@pytest.mark.parametrize(
    "item, needle",
    [
        ("rounds", "key=value"),
        ("rounds 5", "key=value"),
        ("=5", "empty config key"),
        (".=5", "empty config key"),
    ],
)
def test_bad_override_syntax(item, needle):
    assert needle in _err(sets=[item])


def test_value_where_a_section_is_expected():
    assert "not a section" in _err(sets=["cloud=5", "cloud.port=1"])


# --------------------------------------------------------------------------- env, layers


def test_env_overrides_yaml_and_set_overrides_env(tmp_path, monkeypatch):
    p = _yaml(tmp_path, "c.yaml", "cloud:\n  port: 4000\n  host: 0.0.0.0\nrounds: 3\n")
    assert load_config(paths=[p]).cloud.port == 4000

    monkeypatch.setenv("FOGFL_CLOUD__PORT", "5000")
    monkeypatch.setenv("FOGFL_RUN_ID", "from-env")
    monkeypatch.setenv("FOGFL_CLOUD__WARM_START__PER_CLASS", "2")
    monkeypatch.setenv("FOGFL_HOME", "/not/a/config/key")  # reserved, not a config key
    monkeypatch.setenv("FOGFL_LOG_LEVEL", "DEBUG")
    cfg = load_config(paths=[p])
    assert cfg.cloud.port == 5000 and cfg.cloud.host == "0.0.0.0" and cfg.rounds == 3
    assert cfg.run_id == "from-env" and cfg.cloud.warm_start.per_class == 2

    cfg = load_config(paths=[p], sets=["cloud.port=6000"])
    assert cfg.cloud.port == 6000 and cfg.run_id == "from-env"

    assert load_config(paths=[p], use_env=False).cloud.port == 4000


def test_env_overrides_mapping():
    env = {"FOGFL_CLOUD__PORT": "5000", "FOGFL_TRAIN__LR": "0.5", "FOGFL_HOME": "/x", "PATH": "/bin",
           "FOGFL_DATA__CLASS_SPLIT": "[[0], [1]]"}
    assert sorted(env_overrides(env)) == [("cloud.port", 5000), ("data.class_split", [[0], [1]]),
                                          ("train.lr", 0.5)]


def test_yaml_layers_merge_in_order(tmp_path):
    a = _yaml(tmp_path, "a.yaml", "rounds: 3\ncloud:\n  port: 1\n  strategy: median\n")
    b = _yaml(tmp_path, "b.yaml", "cloud:\n  port: 2\n")
    cfg = load_config(paths=[a, b])
    assert cfg.rounds == 3 and cfg.cloud.port == 2 and cfg.cloud.strategy == "median"
    empty = _yaml(tmp_path, "empty.yaml", "# only a comment\n")
    assert read_yaml(empty) == {}
    assert load_config(paths=[empty]) == RunConfig()


def test_yaml_file_errors(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert "does not exist" in _err(paths=[missing])

    bad = _yaml(tmp_path, "bad.yaml", "rounds: 3\ncloud: [1, 2\n  port: 4\n")
    msg = _err(paths=[bad])
    assert "not valid YAML" in msg and str(bad) in msg and "line" in msg

    for text in ("- a\n- b\n", "just a string\n", "0\n", "[]\n", "false\n"):
        p = _yaml(tmp_path, "notmap.yaml", text)
        assert "must hold a mapping" in _err(paths=[p]), text

    assert str(tmp_path) in _err(paths=[tmp_path])  # a directory

    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01rounds")
    assert str(binary) in _err(paths=[binary])
