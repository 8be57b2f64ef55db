"""Fault drill on a loopback deployment: a SuperNode killed mid-round and restarted, and a
ServerApp killed mid-run and resumed.

One SuperLink and ``--nodes`` SuperNodes (real Flower deployment runtime, loopback only, free
ports, a private FLWR_HOME). Two runs of FLUX on digits:

1. **node loss**: when round ``--kill-node-round`` starts, the last SuperNode is killed
   (SIGKILL of its process group); once that round is over it is started again (same
   node-config: same data, a new Flower node id). Checks: that round ends within
   ``round-timeout`` + 30 s, the run completes, the node is recorded offline, comes back into
   its cluster and answers again in a later round.
2. **server crash and resume**: when round ``--kill-server-round`` starts, the ServerApp
   process is killed; ``flwr run`` is submitted again with ``resume-from``. Checks: the run
   completes and its final numbers equal those of an uninterrupted in-process run of the same
   run-config (the same code and partitions; accuracy per client compared exactly).

Writes a JSON report (``--report``) and exits non-zero when a check fails. Every process it
started is stopped at the end, by process group. Usage::

    python scripts/fault_drill.py --report docs/benchmarks/fault-drill.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".venv", "bin")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from deploy_helpers import descendants, stop_session  # noqa: E402


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Loopback:
    """A SuperLink and SuperNodes on loopback, each the leader of its own session."""

    def __init__(self, workdir: str, nodes: int) -> None:
        self.workdir = workdir
        self.nodes = nodes
        self.home = os.path.join(workdir, "flwr-home")
        os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
        os.makedirs(self.home, exist_ok=True)
        self.env = os.environ | {
            "FLWR_HOME": self.home,
            "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        ports = free_ports(nodes + 1)
        self.link_port, self.node_ports = ports[0], ports[1:]
        self.link: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        fh = open(os.path.join(self.workdir, "logs", log), "ab")  # noqa: SIM115
        return subprocess.Popen(
            args,
            cwd=self.workdir,
            env=self.env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start(self) -> None:
        """SuperLink (127.0.0.1 only) and every SuperNode; waits until all are registered."""
        self.link = self._start(
            [
                os.path.join(BIN, "flower-superlink"),
                "--insecure",
                "--isolation",
                "subprocess",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.link_port),
            ],
            "superlink.log",
        )
        with open(os.path.join(self.home, "config.toml"), "w") as fh:
            fh.write(
                '[superlink]\ndefault = "drill"\n\n[superlink.drill]\n'
                f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
            )
        self._wait(lambda: self._connects(self.link_port), 60, "SuperLink")
        for i in range(self.nodes):
            self.start_node(i)
        self._wait(lambda: len(self.node_ids()) == self.nodes, 120, "SuperNodes")

    def start_node(self, i: int) -> None:
        """SuperNode ``i`` (partition ``i`` of ``nodes``)."""
        self.supernodes[i] = self._start(
            [
                os.path.join(BIN, "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.node_ports[i]),
                "--node-config",
                f"partition-id={i} num-partitions={self.nodes}",
            ],
            f"supernode-{i}.log",
        )

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and its ClientApp processes (a crashed site)."""
        proc = self.supernodes.pop(i)
        for pid in descendants(proc.pid)[::-1]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def kill_serverapp(self) -> list[int]:
        """SIGKILL the ServerApp processes under the SuperLink (a crashed server process)."""
        assert self.link is not None
        killed = []
        for pid in descendants(self.link.pid):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            if "serverapp" in cmd and pid != self.link.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return killed

    def flwr(self, *args: str, timeout: float = 120) -> str:
        """Run the ``flwr`` CLI against this SuperLink; its stdout."""
        out = subprocess.run(
            [os.path.join(BIN, "flwr"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return out.stdout + out.stderr

    def node_ids(self) -> list[int]:
        """Node ids the SuperLink lists as online."""
        text = self.flwr("supernode", "ls", "drill", "--format", "json", timeout=60)
        with contextlib.suppress(ValueError, KeyError, TypeError):
            nodes = json.loads(text[text.index("{") :])["nodes"]
            return [
                int(n["node-id"]) for n in nodes if str(n.get("status", "")).lower() == "online"
            ]
        return []

    def status(self, run_id: int) -> str:
        """``flwr ls`` status of a run (e.g. ``finished:completed``)."""
        text = self.flwr("ls", "drill", "--run-id", str(run_id), "--format", "json", timeout=60)
        with contextlib.suppress(ValueError, KeyError, IndexError):
            return json.loads(text[text.index("{") :])["runs"][0]["status"]
        return ""

    def submit(self, overrides: str) -> int:
        """``flwr run . drill`` (not streamed); the run id."""
        text = self.flwr("run", ".", "drill", "--run-config", overrides, "--format", "json")
        with contextlib.suppress(ValueError, KeyError):
            return int(json.loads(text[text.index("{") :])["run-id"])
        raise RuntimeError(f"flwr run did not start a run: {text[-2000:]}")

    def stop(self) -> None:
        """Stop every process this drill started."""
        for proc in list(self.supernodes.values()):
            stop_session(proc)
        if self.link is not None:
            stop_session(self.link)

    @staticmethod
    def _connects(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    @staticmethod
    def _wait(ok: Any, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not ok():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not up within {seconds:.0f} s")
            time.sleep(0.5)


def rows(path: str) -> list[dict[str, Any]]:
    """The rounds of a results.json being written (empty when not there yet)."""
    with contextlib.suppress(OSError, ValueError), open(path) as fh:
        return json.load(fh)["rounds"]
    return []


def checkpoint_round(run_dir: str) -> int:
    """The round of ``run_dir``'s checkpoint (0 before the first; written atomically)."""
    from flux_app.engine.checkpoint import StateError, read

    try:
        return int(read(run_dir)["round"])
    except StateError:
        return 0


def wait_until(pred: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)


def run_values(args: argparse.Namespace) -> dict[str, Any]:
    """The drill's run-config (the same for the deployment and the in-process reference)."""
    return {
        "strategy": args.strategy,
        "dataset": "digits",
        "num-server-rounds": args.rounds,
        "flux-cluster-round": 2,
        "feddag-warmup-rounds": 1,
        "feddag-warmup-epochs": 1,
        "cfl-min-round": 2,
        "local-epochs": args.local_epochs,
    }


def run_config(name: str, out: str, args: argparse.Namespace) -> str:
    """``flwr run --run-config`` text of :func:`run_values` plus timeout, name and folder."""
    values = run_values(args) | {
        "round-timeout": args.round_timeout,
        "run-name": name,
        "output-dir": out,
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def node_loss(link: Loopback, out: str, args: argparse.Namespace) -> dict[str, Any]:
    """Drill 1; returns its record."""
    name, victim = "drill-node-loss", args.nodes - 1
    results = os.path.join(out, name, "results.json")
    run_id = link.submit(run_config(name, out, args))
    k = args.kill_node_round
    wait_until(lambda: len(rows(results)) >= k - 1, 900, f"round {k - 1}")
    t_kill = time.time()
    link.kill_node(victim)
    print(f"[drill] round {k}: killed SuperNode {victim}", flush=True)
    wait_until(lambda: len(rows(results)) >= k, args.round_timeout + 300, f"round {k}")
    lost_round_s = rows(results)[k - 1]["seconds"]
    link.start_node(victim)
    print(f"[drill] round {k} took {lost_round_s:.1f} s; SuperNode {victim} restarted", flush=True)
    wait_until(lambda: link.status(run_id).startswith("finished"), 1800, "the end of the run")
    with open(results) as fh:
        res = json.load(fh)
    nodes = [r["nodes"] for r in res["rounds"]]
    back = [
        r["round"]
        for r in res["rounds"]
        if str(victim) in r["nodes"]["answered"] and r["round"] > k
    ]
    checks = {
        "completed": link.status(run_id) == "finished:completed",
        "lost round within round-timeout + 30 s": lost_round_s <= args.round_timeout + 30,
        "recorded missing or offline": any(
            str(victim) not in n["answered"] for n in nodes[k - 1 : k + 1]
        ),
        "answers again in a later round": bool(back),
        "evaluated at the end": str(victim) in res["final"]["accuracy_by_client"],
        "same cluster as before": res["clustering"]["assignment"].get(str(victim)) is not None,
    }
    return {
        "run_id": run_id,
        "killed_at": t_kill,
        "lost_round": k,
        "lost_round_seconds": lost_round_s,
        "other_rounds_seconds": [r["seconds"] for r in res["rounds"] if r["round"] != k],
        "rounds_back": back,
        "nodes_per_round": nodes,
        "checks": checks,
    }


def server_crash(link: Loopback, out: str, args: argparse.Namespace) -> dict[str, Any]:
    """Drill 2; returns its record."""
    name = "drill-resume"
    results = os.path.join(out, name, "results.json")
    cfg = run_config(name, out, args)
    run_id = link.submit(cfg)
    k = args.kill_server_round
    # the checkpoint of round k - 1, not its results row: the row is written first, and a kill
    # between the two would leave round k - 2 as the last checkpoint
    run_dir = os.path.join(out, name)
    wait_until(lambda: checkpoint_round(run_dir) >= k - 1, 900, f"round {k - 1}'s checkpoint")
    killed = link.kill_serverapp()
    print(f"[drill] round {k}: killed ServerApp process(es) {killed}", flush=True)
    wait_until(lambda: link.status(run_id).startswith("finished"), 300, "the killed run's end")
    first_status = link.status(run_id)
    resumed_id = link.submit(cfg + f' resume-from="{name}"')
    wait_until(lambda: link.status(resumed_id).startswith("finished"), 1800, "the resumed run")
    with open(results) as fh:
        res = json.load(fh)
    # the same run, uninterrupted, in this process (same code, same partitions)
    from flux_app.engine.inprocess import run_inprocess

    ref_cfg = run_values(args) | {
        "output-dir": os.path.join(out, "reference"),
        "run-name": "uninterrupted",
    }
    ref, _ = run_inprocess(ref_cfg, args.nodes)
    keys = ("accuracy_known", "accuracy_by_client", "ari", "num_clusters", "accuracy_routed")
    same = {k: res["final"].get(k) == ref["final"].get(k) for k in keys}
    same["train_loss of every round"] = [r["train_loss"] for r in res["rounds"]] == [
        r["train_loss"] for r in ref["rounds"]
    ]
    checks = {
        "killed run ended failed": first_status == "finished:failed",
        "resumed run completed": link.status(resumed_id) == "finished:completed",
        "resumed after a checkpoint": bool(res.get("resumed")),
        "every round once": [r["round"] for r in res["rounds"]] == list(range(1, args.rounds + 1)),
        "final equals the uninterrupted run": all(same.values()),
    }
    return {
        "run_ids": [run_id, resumed_id],
        "first_status": first_status,
        "resumed": res.get("resumed"),
        "final": {k: res["final"].get(k) for k in keys},
        "uninterrupted_final": {k: ref["final"].get(k) for k in keys},
        "equal": same,
        "checks": checks,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The drill's options (``argv``: default the command line)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-timeout", type=float, default=60.0)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--strategy", default="flux", help="the method both drills run")
    p.add_argument("--kill-node-round", type=int, default=3)
    p.add_argument("--kill-server-round", type=int, default=4)
    p.add_argument("--report", default="")
    p.add_argument("--workdir", default="", help="default: a fresh temporary folder")
    p.add_argument("--only", choices=("node-loss", "server-crash"), default=None)
    args = p.parse_args(argv)
    if (
        not 2 <= args.kill_node_round < args.rounds
        or not 2 <= args.kill_server_round <= args.rounds
    ):
        p.error("kill rounds must lie in 2..rounds-1 (node) / 2..rounds (server)")
    return args


def run_drill(args: argparse.Namespace) -> dict[str, Any]:
    """Both drills (or ``--only`` one) on a fresh loopback deployment; the report, with
    ``failed`` listing the checks that did not hold. Every process started is stopped."""
    workdir = args.workdir or tempfile.mkdtemp(prefix="flux-drill-")
    out = os.path.join(workdir, "outputs")
    link = Loopback(workdir, args.nodes)
    report: dict[str, Any] = {
        "command": "python scripts/fault_drill.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores",
        "workdir": workdir,
    }
    t0 = time.time()
    try:
        link.start()
        if args.only in (None, "node-loss"):
            report["node_loss"] = node_loss(link, out, args)
        if args.only in (None, "server-crash"):
            report["server_crash"] = server_crash(link, out, args)
    finally:
        link.stop()
        report["seconds"] = round(time.time() - t0, 1)
    report["failed"] = [
        f"{drill}: {name}"
        for drill in ("node_loss", "server_crash")
        for name, ok in report.get(drill, {}).get("checks", {}).items()
        if not ok
    ]
    return report


def main() -> int:
    args = parse_args()
    report = run_drill(args)
    text = json.dumps(report, indent=1)
    if args.report:
        with open(args.report, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
