"""The ``fogfl`` command: one entry point, a subcommand per service or job.

Subcommands import their tier lazily, so ``fogfl edge`` never loads torch. Errors a user can
cause end as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from kernel.config import RunConfig, load_config
from kernel.errors import ConfigError, FogflError
from kernel.runtime import own_process, parse_cpu_list, pin_cpus
from protos.errors import WireError

CONFIG_DIR = Path(__file__).parent / "configs"
log = logging.getLogger("fogfl")


def resolve_config_path(name: str) -> Path:
    """A preset name (``massive``) or a file path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in name:
        return p
    preset = CONFIG_DIR / f"{name}.yaml"
    if not preset.exists():
        names = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no config file or preset named {name!r} (presets: {names})")
    return preset


def config_from_args(args: argparse.Namespace, base_default: bool = True) -> RunConfig:
    paths = [CONFIG_DIR / "default.yaml"] if base_default else []
    paths += [resolve_config_path(c) for c in (args.config or [])]
    sets = list(args.set or [])
    mqtt = getattr(args, "mqtt", None)
    if mqtt:
        host, port = parse_hostport(mqtt, "--mqtt")
        sets += [f"mqtt.host={host}", f"mqtt.port={port}"]
    return load_config(paths, sets)


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} expects HOST:PORT, got {text!r}")
    return host, int(port)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("amqtt", "transitions", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- subcommands
def _pin(args: argparse.Namespace) -> None:
    """``--cpus``: restrict the node process to those CPUs before it starts any thread."""
    if args.cpus is not None:
        pin_cpus(parse_cpu_list(args.cpus))


def cmd_run(args: argparse.Namespace) -> int:
    from deploy.launcher import run

    cfg = config_from_args(args)
    own_process()  # the launcher; with --engine inprocess, the whole federation
    return run(cfg, out=args.out, engine=args.engine, attack=not args.no_attack, quiet=args.quiet,
               timeout=args.timeout, placement=args.placement, wan_rtt_ms=args.wan_rtt)


def cmd_broker(args: argparse.Namespace) -> int:
    from deploy.broker import EmbeddedBroker

    stop = _stop_on_signals()
    broker = EmbeddedBroker(args.host, args.port).start()
    log.info("broker ready on %s:%d", broker.host, broker.port)
    try:
        stop.wait()
    finally:
        broker.stop()
    return 0


def cmd_cloud(args: argparse.Namespace) -> int:
    _pin(args)
    cfg = config_from_args(args)
    own_process(malloc=True)  # it moves models over gRPC
    if args.port is not None:
        cfg.cloud.port = args.port
    from cloud.service import run_cloud

    observers, transform = [], None
    if args.tap:
        from attacks.taps import CaptureRecorder

        observers.append(CaptureRecorder(args.tap, source="curious-cloud"))
    if args.malicious:
        if not args.target:
            raise ConfigError("--malicious needs --target FOG_ID")
        if args.target not in cfg.fog_ids():
            raise ConfigError(f"--target {args.target!r} is not a fog of this topology")
        from attacks.malicious import make_transform
        from kernel.data import load_dataset, make_splits

        ds = load_dataset(cfg.data)  # the cloud's own data sets MKOR's brightness bins
        aux = ds.x[make_splits(cfg, ds).test]
        transform = make_transform(args.malicious, args.target, seed=cfg.seed, aux_x=aux, base_train=cfg.train)
        if not args.tap:
            from attacks.taps import CaptureRecorder

            observers.append(CaptureRecorder(Path(args.out) / "captures", source="malicious-cloud",
                                             only={args.target}))
    run_cloud(cfg, args.out, stop=_stop_on_signals(), observers=observers, serve_transform=transform)
    return 0


def cmd_fog(args: argparse.Namespace) -> int:
    _pin(args)
    cfg = config_from_args(args)
    if args.id not in cfg.fog_ids():
        raise ConfigError(f"--id {args.id!r} is not a fog of this topology ({cfg.topology.fogs} fogs: fog-0 …)")
    host, port = parse_hostport(args.cloud, "--cloud")
    own_process(malloc=True)  # it moves models over gRPC
    from fog.service import run_fog

    run_fog(cfg, args.id, f"{host}:{port}", state_dir=args.state, truth_dir=args.truth, stop=_stop_on_signals())
    return 0


def cmd_edge(args: argparse.Namespace) -> int:
    _pin(args)
    cfg = config_from_args(args)
    cfg.edge_index(args.id)  # validates the id against the topology
    own_process()
    from edge.service import run_edge

    initial = None
    if args.model:
        try:
            initial = (Path(args.model).read_bytes(), args.model)
        except OSError as exc:
            raise ConfigError(f"--model {args.model}: {exc.strerror or exc}") from None
        from edge.classifier import OnnxClassifier
        from kernel.errors import ModelError

        try:
            OnnxClassifier(initial[0])
        except ModelError as exc:
            raise ModelError(f"--model {args.model}: {exc}") from None
    run_edge(cfg, args.id, state_dir=args.state, stop=_stop_on_signals(), initial_model=initial)
    return 0


def cmd_tap(args: argparse.Namespace) -> int:
    from attacks.taps import run_tap

    own_process(malloc=True)  # it moves models over gRPC

    listen = parse_hostport(args.listen, "--listen")
    upstream = parse_hostport(args.upstream, "--upstream")
    run_tap(listen, upstream, args.out, stop=_stop_on_signals())
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from attacks.cli import attack_capture

    opts = dict(o.split("=", 1) for o in (args.option or []))
    attack_capture(args.capture, args.method, truth=args.truth, out=args.out, options=opts,
                   progress=not args.quiet)
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from attacks.base import available

    for name, summary in available().items():
        print(f"{name:14s} {summary}")
    return 0


# --------------------------------------------------------------------------- parser
def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", action="append", metavar="FILE|PRESET",
                   help="YAML config or preset name (default, small, nonmassive, massive); repeatable, "
                        "layered over deploy/configs/default.yaml")
    p.add_argument("--set", "-s", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set rounds=5 --set topology.fogs=3")


def _cpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", metavar="LIST", help="run on these CPUs only, e.g. 0 or 0,2 or 0-3 (Linux)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fogfl", description="Federated learning on edge-fog-cloud deployments.")
    ap.add_argument("--log-level", default=os.environ.get("FOGFL_LOG_LEVEL", "INFO"))
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a whole federation on this machine (broker, cloud, fogs, edges)")
    _config_args(p)
    p.add_argument("--out", help="run directory (default runs/<run_id>-<timestamp>; runs/latest links to it)")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="use this broker (e.g. Mosquitto) instead of the embedded one")
    p.add_argument("--engine", choices=["network", "inprocess"], default="network")
    p.add_argument("--placement", choices=["fog-groups", "none"], default="fog-groups",
                   help="network engine, Linux: each fog with its edges on its own share of the CPUs "
                        "(default), or none: leave the processes to the OS scheduler")
    p.add_argument("--wan-rtt", type=float, default=0.0, metavar="MS",
                   help="network engine: the fogs and edges reach the cloud and the broker over an emulated "
                        "WAN with this round-trip time (a delay in user space; default 0, loopback)")
    p.add_argument("--no-attack", action="store_true", help="skip the leakage check at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("broker", help="the embedded MQTT broker (amqtt, MQTT 3.1.1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("cloud", help="the cloud: gRPC aggregator and round scheduler")
    _config_args(p)
    p.add_argument("--mqtt", metavar="HOST:PORT")
    p.add_argument("--port", type=int, help="gRPC port (overrides cloud.port)")
    p.add_argument("--out", default="runs/cloud", help="metrics, checkpoints, captures")
    p.add_argument("--tap", metavar="DIR", help="curious cloud: record every update with the model served for it")
    p.add_argument("--malicious", choices=["mkor"], help="malicious cloud: serve manipulated parameters")
    p.add_argument("--target", metavar="FOG_ID", help="the fog the malicious cloud targets")
    _cpus_arg(p)
    p.set_defaults(func=cmd_cloud)

    p = sub.add_parser("fog", help="a fog gateway")
    _config_args(p)
    p.add_argument("--mqtt", metavar="HOST:PORT")
    p.add_argument("--id", required=True, help="fog id, e.g. fog-0")
    p.add_argument("--cloud", required=True, metavar="HOST:PORT", help="the cloud's (or a tap's) gRPC address")
    p.add_argument("--state", help="directory for the durable sample pool")
    p.add_argument("--truth", help="testbed only: write each round's training samples here, for scoring")
    _cpus_arg(p)
    p.set_defaults(func=cmd_fog)

    p = sub.add_parser("edge", help="an edge device (no torch)")
    _config_args(p)
    p.add_argument("--mqtt", metavar="HOST:PORT")
    p.add_argument("--id", required=True, help="edge id, e.g. fog-0.edge-1")
    p.add_argument("--state", help="directory for the durable outbox")
    p.add_argument("--model", metavar="FILE.onnx", help="start with this ONNX model as version 0 (e.g. the "
                   "cloud's checkpoints/latest.onnx); the fog's models replace it")
    _cpus_arg(p)
    p.set_defaults(func=cmd_edge)

    p = sub.add_parser("tap", help="transparent gRPC proxy between fogs and the cloud that records updates")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_tap)

    p = sub.add_parser("attack", help="reconstruct training samples from a capture")
    p.add_argument("capture", help="a .fcap file")
    p.add_argument("--method", "-m", required=True, help="attack name (see `fogfl attacks`)")
    p.add_argument("--truth", help="ground truth .npz for scoring (default: beside the capture, if present)")
    p.add_argument("--out", help="output directory (default: beside the capture)")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="attack option, e.g. iterations=200")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("attacks", help="list the attacks")
    p.set_defaults(func=cmd_attacks)

    from deploy.study import add_parser as add_study_parser  # light: the study imports torch lazily

    add_study_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except FogflError as exc:
        print(f"fogfl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except WireError as exc:
        print(f"fogfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fogfl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
