"""The container files say what the code does: every compose command parses with the real CLI,
every FOGFL_* variable is a real config key, and the Dockerfiles copy folders that exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from deploy.cli import build_parser
from kernel.config import build_config, env_overrides

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"


def test_compose_commands_parse_and_env_is_valid_config():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    parser = build_parser()
    services = compose["services"]
    assert {"mosquitto", "cloud", "fog-0", "fog-1"} <= set(services)
    for name, svc in services.items():
        if "build" not in svc:
            continue
        dockerfile = svc["build"]["dockerfile"]
        argv = list(svc["command"])
        if dockerfile.endswith("Dockerfile.edge"):
            argv = ["edge", *argv]  # the edge image's entrypoint is `fogfl edge`
        args = parser.parse_args(argv)
        assert args.command in ("cloud", "fog", "edge"), name
        env = {k: str(v) for k, v in svc["environment"].items()}
        cfg = build_config([], env_overrides(env) + [tuple(s.split("=", 1)) for s in (args.set or [])], use_env=False)
        if args.command == "edge":
            cfg.edge_index(args.id)
        if args.command == "fog":
            assert args.id in cfg.fog_ids()
        assert cfg.mqtt.host == "mosquitto"


def test_dockerfiles_copy_existing_paths():
    for df in DOCKER.glob("Dockerfile.*"):
        for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", df.read_text(), flags=re.M):
            for part in src.split():
                assert (ROOT / part).exists(), f"{df.name} copies {part}, which does not exist"


def test_edge_image_installs_no_torch():
    text = (DOCKER / "Dockerfile.edge").read_text()
    assert "torch" not in re.sub(r"#.*", "", text)
