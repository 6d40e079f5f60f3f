"""``fogfl run``: one command, a real federation on this machine.

The network engine starts every service as its own process through the same CLI a deployment
uses (``fogfl broker``, ``fogfl cloud``, ``fogfl fog``, ``fogfl edge``), follows the rounds over
MQTT to show progress, and collects the run directory:

    <out>/config.yaml      the resolved config every process ran with (with ``--wan-rtt``: the
                           cloud's; the fogs and edges ran with config-sites.yaml)
    <out>/metrics.json     per-round accuracy, loss, labels used, bytes, wall time (+ leakage)
    <out>/accuracy.png     accuracy and labels used per round
    <out>/logs/*.log       one log per process
    <out>/captures/        the curious cloud's captures and (testbed) ground truth

On Linux the launcher places each fog with its edges on its own share of the machine's CPUs
(``--cpus`` of ``fogfl fog|edge``; :func:`place_fog_groups`), as a fog gateway and the edge
devices of its site share no hardware with another site. The cloud and the broker are not
pinned. ``fogfl run --placement none`` leaves all of it to the OS scheduler.

``fogfl run --wan-rtt MS`` puts a WAN between the sites and the cloud: the fogs and edges reach
the cloud's gRPC service and the broker through forwarders in the launcher that delay each
direction by MS/2 (:mod:`deploy.wan`); the cloud reaches the broker directly.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.broker import free_port
from deploy.wan import DelayProxy, check_rtt
from kernel.config import RunConfig, dump_config
from kernel.errors import ConfigError, ConnectError, FogflError
from kernel.mqtt import MqttLink
from kernel.runtime import format_cpu_list, settle_heap, usable_cpus
from protos.control import RoundMetrics
from protos.errors import WireError
from protos.topics import Topics

log = logging.getLogger(__name__)


class RunFailed(FogflError):
    """The federation did not finish."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path


def _wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _wait_serving(address: str, timeout: float, proc: subprocess.Popen) -> bool:
    """Until the gRPC server at ``address`` serves (a channel to it is ready; a port bound but not
    yet serving does not count), ``proc`` exits, or ``timeout`` passes."""
    import grpc

    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        ready = grpc.channel_ready_future(channel)
        try:
            while time.monotonic() < end:
                if proc.poll() is not None:
                    return False
                try:
                    ready.result(timeout=0.2)
                    return True
                except grpc.FutureTimeoutError:
                    continue
            return False
        finally:
            ready.cancel()


def make_run_dir(cfg: RunConfig, out: str | None) -> Path:
    if out:
        d = Path(out)
    else:
        d = Path("runs") / f"{cfg.run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    d.mkdir(parents=True, exist_ok=True)
    if not out or d.parent.name == "runs":
        latest = d.parent / "latest"
        try:
            if latest.is_symlink() or latest.exists():
                latest.unlink()
            latest.symlink_to(d.name)
        except OSError:
            pass
    return d


PLACEMENTS = ("fog-groups", "none")
CLOUD_START_S = 120.0  # importing torch on a busy 2-core machine, building the model, the warm start


def place_fog_groups(cfg: RunConfig, cpus: frozenset[int]) -> tuple[dict[str, frozenset[int]], str]:
    """The CPUs of each fog and of each of its edges when one machine runs the whole federation:
    each fog and its edges get an equal share of ``cpus`` (a block of CPUs each when there are more
    CPUs than fogs, a CPU per fog, round-robin, when there are more fogs). Returns the placement
    (node name -> CPUs; empty: nothing pinned) and a one-line account of it.

    Why: the small preset's 8 processes (2 fogs x 2 edges, the cloud, the broker, the launcher) on
    2 CPUs, left to the scheduler, move between the CPUs and evict one another's caches. With each
    fog's group on its own CPU, a networked round (rounds 2..8, median of a run) took 19.9-24.1 ms
    against 25.8-27.9 ms unpinned (4 interleaved runs each); 2 fogs x 3 edges 27.3-31.0 against
    30.1-34.5 ms; 4 fogs x 1 edge (two groups per CPU) 32.2-37.6 against 33.1-38.4 ms, no clear
    difference (docs/benchmarks.md, session 8). Shares that cannot be equal (3 fogs on 2 CPUs)
    would give one CPU more of the round's work than the others, so nothing is pinned then."""
    names = {fog: [fog, *cfg.edge_ids(fog)] for fog in cfg.fog_ids()}
    order = sorted(cpus)
    n, fogs = len(order), len(names)
    if n < 2:
        return {}, f"not pinned: {n} CPU usable"
    if fogs == 1:
        return {}, "not pinned: one fog group, every CPU"
    if cfg.topology.fraction < 1:
        # the fogs selected change every round: a group's fixed share would idle while the others work
        return {}, "not pinned: a fraction of the fogs takes part in each round"
    if fogs % n and n % fogs:
        return {}, f"not pinned: {fogs} fog groups do not share {n} CPUs equally"
    out: dict[str, frozenset[int]] = {}
    for i, group in enumerate(names.values()):
        share = frozenset(order[i * n // fogs:(i + 1) * n // fogs]) if n >= fogs else frozenset({order[i % n]})
        out |= {name: share for name in group}
    per = n // fogs if n >= fogs else 1
    return out, (f"each fog with its edges on {per} of {n} CPUs" if n >= fogs else
                 f"{fogs // n} fog groups per CPU, {n} CPUs")


class NetworkRun:
    def __init__(self, cfg: RunConfig, out: Path, attack: bool, placement: str = "fog-groups",
                 wan_rtt_ms: float = 0.0) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
        self.wan_rtt_ms = check_rtt(wan_rtt_ms)
        self.proxies: list[DelayProxy] = []
        self.cfg = cfg.model_copy(deep=True)
        self.out = out
        self.attack = attack
        if placement == "fog-groups" and hasattr(os, "sched_setaffinity"):
            self.cpus, self.placement = place_fog_groups(self.cfg, usable_cpus())
        else:
            self.cpus, self.placement = {}, "not pinned (--placement none)" if placement == "none" else \
                "not pinned: this OS cannot restrict a process to CPUs"
        self.children: list[Child] = []
        self.arrivals: dict[int, float] = {}  # round -> monotonic time its metrics reached the launcher
        (out / "logs").mkdir(exist_ok=True)

    def _spawn(self, name: str, argv: list[str]) -> Child:
        log_path = self.out / "logs" / f"{name}.log"
        fh = open(log_path, "wb")
        env = dict(os.environ)
        env.setdefault("FOGFL_LOG_LEVEL", "INFO")
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")  # many small processes on few cores
        if name in self.cpus:
            argv = [*argv, "--cpus", format_cpu_list(self.cpus[name])]
        proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        fh.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def _last_line(self, child: Child) -> str:
        try:
            lines = child.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def start(self) -> None:
        cfg = self.cfg
        if cfg.mqtt.host is None:
            port = free_port()
            broker = self._spawn("broker", ["broker", "--host", "127.0.0.1", "--port", str(port)])
            if not _wait_port("127.0.0.1", port, 30, broker.proc):
                raise RunFailed(f"embedded broker did not start: {self._last_line(broker)}")
            cfg.mqtt.host, cfg.mqtt.port = "127.0.0.1", port
        else:
            if not _wait_port(cfg.mqtt.host, cfg.mqtt.port, 3):
                raise ConnectError(f"cannot reach MQTT broker at {cfg.mqtt.host}:{cfg.mqtt.port}")
        if not cfg.cloud.port:
            cfg.cloud.port = free_port()
        cfg_path = self.out / "config.yaml"
        cfg_path.write_text(dump_config(cfg))
        cloud_argv = ["cloud", "--config", str(cfg_path), "--out", str(self.out)]
        if self.attack:
            cloud_argv += ["--tap", str(self.out / "captures")]
        self.cloud = self._spawn("cloud", cloud_argv)
        # the sites start once the cloud serves: by then it has cleared what an earlier run of this
        # run_id left retained on the broker (an edge would take that run's end for this one's)
        if not _wait_serving(f"{cfg.cloud.host}:{cfg.cloud.port}", CLOUD_START_S, self.cloud.proc):
            raise RunFailed(f"the cloud did not start serving within {CLOUD_START_S:.0f}s: "
                            f"{self._last_line(self.cloud)}")
        cloud_addr = f"{cfg.cloud.host}:{cfg.cloud.port}"
        if self.wan_rtt_ms:  # the sites reach the cloud and the broker through the WAN's forwarders
            one_way = self.wan_rtt_ms / 2000
            grpc_wan = DelayProxy((cfg.cloud.host, cfg.cloud.port), one_way)
            mqtt_wan = DelayProxy((cfg.mqtt.host, cfg.mqtt.port), one_way)
            self.proxies = [grpc_wan, mqtt_wan]
            cloud_addr = f"127.0.0.1:{grpc_wan.start()}"
            sites = cfg.model_copy(deep=True)
            sites.mqtt.host, sites.mqtt.port = "127.0.0.1", mqtt_wan.start()
            cfg_path = self.out / "config-sites.yaml"
            cfg_path.write_text(dump_config(sites))
            log.info("WAN between the sites and the cloud: %.1f ms round trip", self.wan_rtt_ms)
        common = ["--config", str(cfg_path)]
        for fog_id in cfg.fog_ids():
            argv = ["fog", *common, "--id", fog_id, "--cloud", cloud_addr, "--state", str(self.out / "state" / fog_id)]
            if self.attack:
                argv += ["--truth", str(self.out / "captures")]
            self._spawn(fog_id, argv)
            for edge_id in cfg.edge_ids(fog_id):
                self._spawn(edge_id, ["edge", *common, "--id", edge_id, "--state", str(self.out / "state" / edge_id)])

    def follow(self, timeout: float, quiet: bool) -> list[RoundMetrics]:
        """Show progress from the metrics topic until the cloud exits."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        topics = Topics(self.cfg.run_id)
        seen: dict[int, RoundMetrics] = {}

        def on_metrics(topic: str, payload: bytes) -> None:
            if payload:
                try:
                    m = RoundMetrics.from_json(payload)
                except WireError:
                    return
                self.arrivals.setdefault(m.round, time.monotonic())
                seen[m.round] = m

        link = MqttLink(self.cfg.mqtt, f"{self.cfg.run_id}-launcher-{os.getpid()}")
        link.subscribe(topics.metrics, on_metrics)
        link.connect()
        end = time.monotonic() + timeout
        progress = Progress(TextColumn("[bold]federation"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=quiet, transient=False)
        try:
            with progress:
                task = progress.add_task("rounds", total=self.cfg.rounds, info="starting services…")
                while self.cloud.proc.poll() is None:
                    if time.monotonic() > end:
                        raise RunFailed(f"the federation did not finish within {timeout:.0f}s "
                                        f"(logs in {self.out / 'logs'})")
                    dead = [c for c in self.children if c.proc.poll() not in (None, 0) and c is not self.cloud]
                    if dead:
                        c = dead[0]
                        raise RunFailed(f"{c.name} exited with code {c.proc.returncode}: {self._last_line(c)}")
                    if seen:
                        last = seen[max(seen)]
                        progress.update(task, completed=len(seen),
                                        info=f"acc {last.accuracy:.3f}  labels {last.labels_used}")
                    time.sleep(0.2)
                if seen:
                    last = seen[max(seen)]
                    progress.update(task, completed=len(seen), info=f"acc {last.accuracy:.3f}  labels {last.labels_used}")
        finally:
            link.close()
        if self.cloud.proc.returncode != 0:
            raise RunFailed(f"cloud exited with code {self.cloud.proc.returncode}: {self._last_line(self.cloud)}")
        return [seen[k] for k in sorted(seen)]

    def stop(self) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.terminate()
        for proxy in self.proxies:
            proxy.stop()
        end = time.monotonic() + 10
        for c in self.children:
            try:
                c.proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()


def round_periods(arrivals: dict[int, float]) -> dict[str, float]:
    """Round k's period: from round k-1's metrics to round k's, as the launcher saw them arrive
    (monotonic seconds per round). Everything a round costs, also what the cloud does between
    evaluating one round and announcing the next; the in-process engine's ``run_round()`` time
    measures the same span."""
    return {str(k): arrivals[k] - arrivals[k - 1] for k in sorted(arrivals) if k - 1 in arrivals}


def plot_accuracy(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [r["round"] for r in metrics["rounds"]]
    acc = [metrics.get("initial_accuracy", float("nan"))] + [r["accuracy"] for r in metrics["rounds"]]
    labels = [0] + [r["labels_used"] for r in metrics["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(rounds, acc, "o-", color="tab:blue", label="test accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy", color="tab:blue")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(rounds, labels, "s--", color="tab:orange", label="labels used")
    ax2.set_ylabel("labels used (edges)", color="tab:orange")
    cfg = metrics.get("config", {})
    ax.set_title(f"{cfg.get('run_id', '')}: {cfg.get('data', {}).get('dataset', '')}, "
                 f"{cfg.get('acquisition', {}).get('strategy', '')} sampling", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_summary(metrics: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fogfl run — {out}", show_lines=False)
    for col in ("round", "accuracy", "loss", "labels", "bytes up", "bytes down", "wall s"):
        t.add_column(col, justify="right")
    for r in metrics["rounds"]:
        t.add_row(str(r["round"]), f"{r['accuracy']:.4f}", f"{r['loss']:.4f}", str(r["labels_used"]),
                  f"{r['bytes_up']:,}", f"{r['bytes_down']:,}", f"{r['wall_s']:.2f}")
    console = Console()
    console.print(t)
    console.print(f"final accuracy [bold]{metrics['final_accuracy']:.4f}[/bold] "
                  f"(initial {metrics.get('initial_accuracy', float('nan')):.4f}); "
                  f"total wall {metrics.get('wall_s', 0):.1f}s")
    leak = metrics.get("leakage")
    if leak:
        console.print(f"leakage: {leak['summary']}")


def run(cfg: RunConfig, out: str | None = None, engine: str = "network", attack: bool = True, quiet: bool = False,
        timeout: float = 900.0, placement: str = "fog-groups", wan_rtt_ms: float = 0.0) -> int:
    check_rtt(wan_rtt_ms)
    if wan_rtt_ms and engine == "inprocess":
        raise ConfigError("--wan-rtt needs the network engine (the in-process engine has no network)")
    run_dir = make_run_dir(cfg, out)
    t0 = time.monotonic()
    arrivals: dict[int, float] = {}
    if engine == "inprocess":
        from deploy.engine import run_inprocess

        run_inprocess(cfg, run_dir, capture=attack, progress=not quiet)
    else:
        net = NetworkRun(cfg, run_dir, attack, placement, wan_rtt_ms)
        log.info("placement: %s", net.placement)
        try:
            net.start()
            settle_heap()  # this process times the rounds: no full collection in the middle of one
            net.follow(timeout, quiet)
        finally:
            net.stop()
        arrivals = net.arrivals
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise RunFailed(f"no metrics.json in {run_dir} (see {run_dir / 'logs'})")
    metrics = json.loads(metrics_path.read_text())
    metrics["wall_s"] = time.monotonic() - t0
    metrics["engine"] = engine
    if engine != "inprocess":
        metrics["round_period_s"] = round_periods(arrivals)
        metrics["placement"] = {"summary": net.placement,
                                "cpus": {name: format_cpu_list(c) for name, c in net.cpus.items()}}
        metrics["wan_rtt_ms"] = net.wan_rtt_ms
    if attack:
        from deploy.leakage import leakage_check

        metrics["leakage"] = leakage_check(run_dir / "captures", run_dir / "leakage")
    metrics_path.write_text(json.dumps(metrics, indent=2))
    plot_accuracy(metrics, run_dir / "accuracy.png")
    if not quiet:
        print_summary(metrics, run_dir)
    return 0
