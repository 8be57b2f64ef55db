#!/usr/bin/env python
"""What Flower's runtimes cost: the same federated work as a bare loop, `flwr run`, a deployment.

Runs the same run-config three ways, alternately (A B C A B C ...) so that all see the same
machine load, each in fresh processes on the same cores (issue #15):

- **bare**: FedAvg as a plain PyTorch loop (``scripts/overhead.py``'s ``bare_fedavg``: the same
  partitions, model, optimiser, epochs, batch size and per-round evaluation), in a fresh Python
  process, every round timed by this script (only for ``strategy="fedavg"``);
- **flwr-run**: ``scripts/simulate.py --stop-superlink`` (``flwr run . --stream``: a local
  SuperLink, Flower's Ray simulation engine), with its own FLWR_HOME and its own free ports
  (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, ``FLWR_LOCAL_CONTROL_API_PORT``), so it never reuses a
  SuperLink that something else started on Flower's default port;
- **deploy**: ``scripts/deploy_local.sh`` (one SuperLink, N SuperNodes and ``flwr run`` on
  loopback, insecure mode, its own work folder and free ports; it stops what it started), with
  its defaults: warm ClientApps (``flux_app.deploy.warm_exec``), SuperNode pauses capped at
  0.3 s (``flux_app.deploy.supernode``), task polls every 0.3 s;
- **deploy-flower**: the same deployment at Flower's own pace (``--clientapp cold --node-poll
  flower``, ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=1``): a fresh ``flwr-clientapp`` program per
  message, 3 s between idle pulls.

Per run: start-up (launch to the first round's begin: the round-1 line of the ServerApp's log,
as streamed, minus round 1's ``seconds``; for bare the worker's own clock), every round's
``seconds`` (results.json; bare: timed here), the ServerApp's ``wall_seconds`` and the wall time
of the whole command. Summary: per-round median over rounds 2..R (round 1 apart) and the ratios
flwr-run / bare and deploy / flwr-run, paired by repeat.

For the deployment, where a round's time goes: the SuperNodes' logs are read as they are
written and time-stamped here (every message's receive, ``flwr-clientapp`` start and reply),
giving per round the messages and ClientApp processes per node, the time a node spends on a
message, and the time no node has a message in hand (server work and polling). A probe in fresh
processes times ``python -c pass``, ``flwr-clientapp --help``, ``python -c "import client_app"``
and, after that import, loading a partition, one train and one evaluate handler call.

Every process started is tracked (its process tree, sampled every 0.5 s, and anything naming
the work folder or this script's ports) and checked gone after each run; leftovers are stopped
and listed in the output. Results: docs/benchmarks/flwr-overhead.json and a markdown table.

Examples
--------
    python scripts/flwr_overhead.py --repeats 2
    python scripts/flwr_overhead.py --settings fedavg-digits --repeats 1 --rounds 2 --nodes 3
    python scripts/flwr_overhead.py --settings fedavg-digits:2,flux-digits:1,flux-fmnist:1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
OUT = os.path.join(ROOT, "docs", "benchmarks", "flwr-overhead.json")
PY = sys.executable

#: name -> (run-config without num-server-rounds, the paths it is measured on)
SETTINGS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "fedavg-digits": (
        {"strategy": "fedavg", "dataset": "digits"},
        ("bare", "flwr-run", "deploy", "deploy-flower"),
    ),
    "flux-digits": (
        {"strategy": "flux", "dataset": "digits"},
        ("flwr-run", "deploy", "deploy-flower"),
    ),
    "flux-fmnist": (
        {"strategy": "flux", "dataset": "fmnist", "shift": "px", "level": 2, "local-epochs": 1},
        ("flwr-run", "deploy", "deploy-flower"),
    ),
}
MODE_TITLE = {
    "bare": "bare loop",
    "flwr-run": "flwr run (Ray)",
    "deploy": "deployment",
    "deploy-flower": "deployment, Flower's pace",
}
MODES = tuple(MODE_TITLE)
#: every process tracker started, for the final check that nothing is left running
TRACKERS: list[Tracker] = []
ROUND_LINE = re.compile(r"\[round (\d+)/(\d+)\].*seconds=([0-9.]+)")


# ----------------------------------------------------------------------------- helpers
def render(config: dict[str, Any]) -> str:
    """``key=value ...`` as ``flwr run -c`` takes it (strings quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (bound together, so they cannot repeat)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def child_env() -> dict[str, str]:
    """The children's environment: ours, without a Ray cluster to join, without telemetry."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(PY) + os.pathsep + env.get("PATH", "")
    return env


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def spread(values: list[float | None], digits: int = 1) -> str:
    """``median`` or ``median (min-max)`` of the repeats."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt(vals[0], digits)
    return f"{fmt(statistics.median(vals), digits)} ({fmt(min(vals), digits)}-{fmt(max(vals), digits)})"


# ----------------------------------------------------------------------------- processes
def _proc_table() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, session id, start time in ticks, command line) of every live process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(name)] = (int(fields[1]), int(fields[3]), fields[19], cmd)
    return table


def _omp_threads(pid: int) -> str:
    """The process's OMP_NUM_THREADS (``unset``; ``?`` when its environment cannot be read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read().split(b"\0")
    except OSError:
        return "?"
    for item in env:
        if item.startswith(b"OMP_NUM_THREADS="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return "unset"


def process_kind(cmd: str) -> str:
    """A short name for a command line: the program (the script for ``python script``)."""
    parts = cmd.split()
    if not parts:
        return "?"
    if parts[0].startswith("ray::"):
        return parts[0]
    prog = os.path.basename(parts[0])
    if prog.startswith("python") and len(parts) > 1:
        arg = parts[1] if parts[1] not in ("-u", "-m") else (parts[2] if len(parts) > 2 else "")
        return os.path.basename(arg) if arg else prog
    return prog


class Tracker(threading.Thread):
    """Samples, every ``interval`` s, the process tree under ``root`` and every process whose
    command line names one of ``patterns`` (the work folder, this run's ports); remembers them
    all (pid, start time, command), so that leftovers can be found and stopped afterwards."""

    def __init__(self, root: int, patterns: list[str], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.patterns, self.interval = root, patterns, interval
        self.seen: dict[tuple[int, str], str] = {}
        self._halt = threading.Event()
        self.sim_pids: set[int] = set()
        #: kind -> OMP_NUM_THREADS in its processes' environment at exec ("unset": none; Ray
        #: sets it later, inside each worker: ray/_private/utils.py set_omp_num_threads_if_unset)
        self.threads_env: dict[str, set[str]] = {}

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.sample()

    def sample(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_rest) in table.items():
            children.setdefault(ppid, []).append(pid)
        mine, todo = set(), [self.root]
        while todo:
            p = todo.pop()
            if p in mine:
                continue
            mine.add(p)
            todo.extend(children.get(p, []))
        ray_session = (
            re.compile(r"session_[0-9_-]+_(" + "|".join(map(str, self.sim_pids)) + r")\b")
            if self.sim_pids
            else None
        )
        for pid, (_ppid, _sid, start, cmd) in table.items():
            if pid == os.getpid():
                continue
            hit = pid in mine or any(p in cmd for p in self.patterns)
            hit = hit or (ray_session is not None and bool(ray_session.search(cmd)))
            if hit and cmd and (pid, start) not in self.seen:
                self.seen[(pid, start)] = cmd
                kind = process_kind(cmd)
                if kind == "flwr-simulation":
                    self.sim_pids.add(pid)
                if kind in ("flwr-clientapp", "ray::ClientAppActor", "flwr_overhead.py"):
                    self.threads_env.setdefault(kind, set()).add(_omp_threads(pid))

    def kinds(self) -> dict[str, int]:
        """How many distinct processes of each kind were seen."""
        out: dict[str, int] = {}
        for cmd in self.seen.values():
            k = process_kind(cmd)
            out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items()))

    def alive(self) -> list[tuple[int, str]]:
        """(pid, command) of the seen processes still running (same pid AND start time)."""
        table = _proc_table()
        return [
            (pid, cmd)
            for (pid, start), cmd in self.seen.items()
            if pid in table and table[pid][2] == start
        ]


def stop_leftovers(tracker: Tracker, grace: float = 20.0) -> list[str]:
    """Wait up to ``grace`` s for the tracked processes to end, then TERM, then KILL (by pid)
    whatever is left; returns the command lines of what had to be stopped."""
    deadline = time.time() + grace
    while time.time() < deadline and tracker.alive():
        time.sleep(0.5)
    left = tracker.alive()
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 15
    while time.time() < deadline and tracker.alive():
        time.sleep(0.3)
    for pid, _ in tracker.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return [f"{pid} {cmd[:200]}" for pid, cmd in left]


class LogTail(threading.Thread):
    """Time-stamps the lines of the files matching ``folder/prefix*suffix`` as they are written."""

    def __init__(self, folder: str, prefix: str, suffix: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.folder, self.prefix, self.suffix, self.interval = folder, prefix, suffix, interval
        self.lines: dict[str, list[tuple[float, str]]] = {}
        self._pos: dict[str, int] = {}
        self._rest: dict[str, str] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.poll()

    def poll(self) -> None:
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        now = time.time()
        for name in names:
            if not (name.startswith(self.prefix) and name.endswith(self.suffix)):
                continue
            try:
                with open(os.path.join(self.folder, name), errors="replace") as fh:
                    fh.seek(self._pos.get(name, 0))
                    chunk = fh.read()
                    self._pos[name] = fh.tell()
            except OSError:
                continue
            text = self._rest.get(name, "") + chunk
            *full, self._rest[name] = text.split("\n")
            self.lines.setdefault(name, []).extend((now, line) for line in full)


def run_command(
    cmd: list[str], env: dict[str, str], log_path: str, timeout: float, patterns: list[str]
) -> tuple[int, list[tuple[float, str]], float, float, Tracker]:
    """Run ``cmd`` in its own session; return (exit status, time-stamped output lines, launch
    time, end time, its process tracker, already stopped)."""
    lines: list[tuple[float, str]] = []
    t_launch = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    tracker = Tracker(proc.pid, patterns)
    TRACKERS.append(tracker)
    tracker.start()
    killer = threading.Timer(timeout, lambda: _kill_session(proc.pid))
    killer.start()
    assert proc.stdout is not None
    try:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                now = time.time()
                lines.append((now, line.rstrip("\n")))
                log.write(f"{now - t_launch:9.3f} {line}")
                log.flush()
        rc = proc.wait()
    except BaseException:
        _kill_session(proc.pid)
        proc.wait()
        raise
    finally:
        killer.cancel()
        tracker.stop()
    return rc, lines, t_launch, time.time(), tracker


def _kill_session(pid: int) -> None:
    """SIGTERM the session led by ``pid`` (a child started with start_new_session), KILL later."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)

    def later() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    timer = threading.Timer(20, later)
    timer.daemon = True
    timer.start()


# ----------------------------------------------------------------------------- one run
def read_results(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def round_anchors(lines: list[tuple[float, str]]) -> dict[int, tuple[float, float]]:
    """round -> (begin, end) on this machine's clock, from the streamed ``[round k/R]`` lines
    (end: when the line arrived; begin: end minus the round's ``seconds``)."""
    out = {}
    for t, line in lines:
        if m := ROUND_LINE.search(line):
            out[int(m.group(1))] = (t - float(m.group(3)), t)
    return out


def summarise_rounds(seconds: list[float]) -> dict[str, Any]:
    return {
        "rounds_s": seconds,
        "round1_s": seconds[0] if seconds else None,
        "rounds_2_on_median_s": median(seconds[1:]) if len(seconds) > 1 else None,
        "rounds_sum_s": round(sum(seconds), 3),
    }


def run_flwr(
    mode: str, setting: str, rep: int, config: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """One run through scripts/simulate.py (``flwr-run``) or scripts/deploy_local.sh
    (``deploy``)."""
    tag = f"{setting}-{mode}-r{rep}"
    folder = os.path.join(args.workdir, tag)
    os.makedirs(folder, exist_ok=True)
    out_dir = os.path.join(args.workdir, "outputs")
    run_name = f"fo-{tag}-{time.strftime('%H%M%S')}"
    full = config | {"output-dir": out_dir, "run-name": run_name}
    env = child_env()
    patterns = [folder]
    if mode == "flwr-run":
        http_port, control_port = free_ports(2)
        env.update(
            FLUX_APP_FLWR_HOME=os.path.join(folder, "flwr-home"),
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
            FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        )
        patterns += [f"127.0.0.1:{http_port}", f"127.0.0.1:{control_port}"]
        cmd = [PY, os.path.join(SCRIPTS, "simulate.py"), "--nodes", str(args.nodes)]
        cmd += ["--stop-superlink", "--timeout", str(args.timeout), "-c", render(full)]
        extra = {"superlink_ports": [http_port, control_port]}
    else:
        cmd = ["bash", os.path.join(SCRIPTS, "deploy_local.sh"), "-n", str(args.nodes)]
        cmd += ["--workdir", folder, "--timeout", str(args.timeout), "-c", render(full)]
        if mode == "deploy-flower":  # Flower's own: cold ClientApps, 3 s / 1 s pauses
            cmd += ["--clientapp", "cold", "--node-poll", "flower"]
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "1"
        extra = {}
    deploying = mode.startswith("deploy")
    tail = LogTail(os.path.join(folder, "logs"), "supernode-", ".log") if deploying else None
    if tail is not None:
        tail.start()
    load = os.getloadavg()
    print(f"[flwr-overhead] {tag}: {shlex.join(cmd)}", flush=True)
    try:
        rc, lines, t0, t1, tracker = run_command(
            cmd, env, os.path.join(folder, "output.log"), args.timeout + 300, patterns
        )
    finally:
        if tail is not None:
            tail.stop()
    leftovers = stop_leftovers(tracker)
    results = read_results(os.path.join(out_dir, run_name, "results.json"))
    rows = (results or {}).get("rounds") or []
    seconds = [float(r["seconds"]) for r in rows]
    anchors = round_anchors(lines)
    startup = anchors[1][0] - t0 if 1 in anchors else None
    last_round = anchors.get(max(anchors)) if anchors else None
    final = (results or {}).get("final") or {}
    run = {
        "setting": setting,
        "mode": mode,
        "repeat": rep,
        "command": shlex.join(cmd),
        "env": {k: env[k] for k in env if k.startswith(("FLUX_APP_FLWR_HOME", "FLWR_LOCAL_"))},
        "rc": rc,
        "ok": rc == 0 and bool(rows) and len(rows) == config["num-server-rounds"],
        "wall_s": round(t1 - t0, 3),
        "startup_s": None if startup is None else round(startup, 3),
        "teardown_s": None if last_round is None else round(t1 - last_round[1], 3),
        "outside_rounds_s": round(t1 - t0 - sum(seconds), 3) if seconds else None,
        "app_wall_s": final.get("wall_seconds"),
        **summarise_rounds(seconds),
        "nodes_asked": [len(r.get("nodes", {}).get("asked", [])) for r in rows],
        "phases": [r.get("phase") for r in rows],
        "accuracy_known": final.get("accuracy_known"),
        "num_clusters": final.get("num_clusters"),
        "loadavg_before": [round(x, 2) for x in load],
        "processes_seen": tracker.kinds(),
        "omp_num_threads_at_exec": {k: sorted(v) for k, v in tracker.threads_env.items()},
        "leftovers_stopped": leftovers,
        "log": os.path.join(folder, "output.log"),
        **extra,
    }
    if tail is not None:
        run["breakdown"] = deploy_breakdown(tail.lines, anchors, seconds)
    if not run["ok"]:
        run["output_tail"] = [line for _, line in lines[-40:]]
    return run


def run_bare(setting: str, rep: int, config: dict[str, Any], args: argparse.Namespace) -> dict:
    """One bare FedAvg run in a fresh process (this script's ``--bare-worker``)."""
    tag = f"{setting}-bare-r{rep}"
    folder = os.path.join(args.workdir, tag)
    os.makedirs(folder, exist_ok=True)
    spec = {"config": config, "nodes": args.nodes, "threads": args.bare_threads}
    cmd = [PY, os.path.abspath(__file__), "--bare-worker", json.dumps(spec)]
    load = os.getloadavg()
    print(f"[flwr-overhead] {tag}: {shlex.join(cmd)}", flush=True)
    rc, lines, t0, t1, tracker = run_command(
        cmd, child_env(), os.path.join(folder, "output.log"), args.timeout, [folder]
    )
    leftovers = stop_leftovers(tracker)
    report = {}
    for _, line in lines:
        if line.startswith("BARE "):
            report = json.loads(line[5:])
    ends = report.get("round_end", [])
    begin = report.get("t_begin")
    seconds = [round(b - a, 3) for a, b in zip([begin] + ends[:-1], ends, strict=False)]
    return {
        "setting": setting,
        "mode": "bare",
        "repeat": rep,
        "command": shlex.join(cmd),
        "rc": rc,
        "ok": rc == 0 and len(seconds) == config["num-server-rounds"],
        "wall_s": round(t1 - t0, 3),
        "startup_s": round(begin - t0, 3) if begin else None,
        "startup_parts_s": {
            "interpreter_to_main": round(report["t_main"] - t0, 3) if "t_main" in report else None,
            "imports": report.get("imports_s"),
            "data": report.get("data_s"),
        },
        "teardown_s": round(t1 - ends[-1], 3) if ends else None,
        "outside_rounds_s": round(t1 - t0 - sum(seconds), 3) if seconds else None,
        "app_wall_s": None,
        **summarise_rounds(seconds),
        "accuracy_known": report.get("accuracy"),
        "torch_threads": args.bare_threads,
        "loadavg_before": [round(x, 2) for x in load],
        "processes_seen": tracker.kinds(),
        "leftovers_stopped": leftovers,
        "log": os.path.join(folder, "output.log"),
    }


def bare_worker(spec: dict[str, Any]) -> int:
    """``--bare-worker``: times imports, data and every round of ``bare_fedavg``."""
    t_main = time.time()
    sys.path[:0] = [ROOT, SCRIPTS]
    import logging

    import torch
    from overhead import bare_fedavg  # scripts/overhead.py

    from flux_app.engine.client import ClientRuntime
    from flux_app.engine.config import RunConfig

    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(int(spec["threads"]))
    t_imports = time.time()
    cfg = RunConfig.from_mapping(spec["config"])
    nodes = int(spec["nodes"])
    for pid in range(nodes):  # the partitions (lru-cached): bare_fedavg then finds them loaded
        _ = ClientRuntime(cfg, pid, nodes).data
    t_begin = time.time()
    ends: list[float] = []
    acc = bare_fedavg(cfg, nodes, on_round=lambda rnd, a: ends.append(time.time()))
    report = {
        "t_main": t_main,
        "imports_s": round(t_imports - t_main, 3),
        "data_s": round(t_begin - t_imports, 3),
        "t_begin": t_begin,
        "round_end": ends,
        "accuracy": acc,
    }
    print("BARE " + json.dumps(report), flush=True)
    return 0


# ----------------------------------------------------------------------------- deployment breakdown
RECV = re.compile(r"Receiving: (\S+) message")
SEND = re.compile(r"Sending: (\S+) message")
ROUND_HDR = re.compile(r"\[RUN \d+, ROUND (\d+)\]")


def node_messages(lines: list[tuple[float, str]], node: str) -> list[dict[str, Any]]:
    """A SuperNode log's messages: round, type, received, ClientApp started, reply sent."""
    rnd = None
    pending: dict[str, list[dict[str, Any]]] = {}
    last: dict[str, Any] | None = None
    done = []
    for t, line in lines:
        if m := ROUND_HDR.search(line):
            rnd = int(m.group(1))
        elif m := RECV.search(line):
            last = {"node": node, "round": rnd, "type": m.group(1), "recv": t}
            pending.setdefault(m.group(1), []).append(last)
        elif "Start `flwr-clientapp` process" in line and last is not None:
            last.setdefault("clientapp", t)
        elif (m := SEND.search(line)) and pending.get(m.group(1)):
            msg = pending[m.group(1)].pop(0)
            msg["send"] = t
            done.append(msg)
    return done


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def deploy_breakdown(
    node_lines: dict[str, list[tuple[float, str]]],
    anchors: dict[int, tuple[float, float]],
    seconds: list[float],
) -> dict[str, Any]:
    """Per round: messages and ClientApp processes per node, a node's time per message
    (received -> reply sent, median over nodes), and the time no node had a message of the round
    in hand (the round's seconds minus the union of the nodes' message intervals)."""
    msgs = []
    for name, lines in sorted(node_lines.items()):
        msgs += node_messages(lines, name.removesuffix(".log"))
    nodes = max(len(node_lines), 1)
    out: dict[str, Any] = {"rounds": {}, "messages_outside_rounds": 0}
    for rnd, secs in enumerate(seconds, start=1):
        mine = [m for m in msgs if m["round"] == rnd]
        types: dict[str, Any] = {}
        for m in mine:
            entry = types.setdefault(m["type"], {"messages": 0, "clientapps": 0, "handle_s": []})
            entry["messages"] += 1
            entry["clientapps"] += int("clientapp" in m)
            entry["handle_s"].append(m["send"] - m["recv"])
        for entry in types.values():
            h = entry.pop("handle_s")
            entry["node_seconds_per_message_median"] = round(statistics.median(h), 2)
            entry["node_seconds_per_message_max"] = round(max(h), 2)
        busy = _union([(m["recv"], m["send"]) for m in mine])
        row = {
            "seconds": secs,
            "messages_per_node": round(len(mine) / nodes, 2),
            "clientapp_processes": sum(int("clientapp" in m) for m in mine),
            "by_type": types,
            "some_node_busy_s": round(busy, 2),
            "no_node_busy_s": round(max(secs - busy, 0.0), 2),
        }
        if rnd in anchors and mine:
            row["first_receive_after_round_begin_s"] = round(
                min(m["recv"] for m in mine) - anchors[rnd][0], 2
            )
            row["round_end_after_last_reply_s"] = round(
                anchors[rnd][1] - max(m["send"] for m in mine), 2
            )
        out["rounds"][str(rnd)] = row
    out["messages_outside_rounds"] = sum(
        1 for m in msgs if m["round"] is None or not 1 <= m["round"] <= len(seconds)
    )
    out["clientapp_processes_total"] = sum(int("clientapp" in m) for m in msgs)
    out["messages_total"] = len(msgs)
    return out


# ----------------------------------------------------------------------------- probe
def _timed(cmd: list[str]) -> tuple[float, int]:
    t = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, timeout=600).returncode
    return round(time.perf_counter() - t, 3), rc


def run_probe(setting: str, rep: int, config: dict[str, Any], args: argparse.Namespace) -> dict:
    """What one ClientApp process pays, piece by piece, in fresh processes (one after another);
    then ``nodes`` fresh processes training at once, as a deployment round's train messages do
    on one machine (torch's default threads, then OMP_NUM_THREADS=1)."""
    out: dict[str, Any] = {"setting": setting, "repeat": rep}
    out["python_pass_s"], _ = _timed([PY, "-c", "pass"])
    out["flwr_clientapp_help_s"], _ = _timed(
        [os.path.join(os.path.dirname(PY), "flwr-clientapp"), "--help"]
    )
    out["import_client_app_s"], rc = _timed([PY, "-c", "import client_app"])
    spec = {"config": config, "nodes": args.nodes}
    # as a ClientApp process gets it (torch's default threads), then with OMP_NUM_THREADS=1
    # (what Ray gives an actor that reserved 1 CPU)
    codes = []
    for prefix, extra in (("", {}), ("omp1_", {"OMP_NUM_THREADS": "1"})):
        proc = subprocess.run(
            [PY, os.path.abspath(__file__), "--probe-worker", json.dumps(spec)],
            cwd=ROOT,
            env=child_env() | extra,
            capture_output=True,
            text=True,
            timeout=900,
        )
        codes.append(proc.returncode)
        for line in proc.stdout.splitlines():
            if line.startswith("PROBE "):
                out.update({prefix + k: v for k, v in json.loads(line[6:]).items()})
        if proc.returncode:
            out[prefix + "stderr_tail"] = proc.stderr[-2000:]
    # as a deployment round runs its train messages: one fresh process per node, all at once
    for prefix, extra in (("concurrent_", {}), ("concurrent_omp1_", {"OMP_NUM_THREADS": "1"})):
        t = time.perf_counter()
        procs = [
            subprocess.Popen(
                [PY, os.path.abspath(__file__), "--probe-worker"]
                + [json.dumps(spec | {"partition": i, "again": False})],
                cwd=ROOT,
                env=child_env() | extra,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for i in range(args.nodes)
        ]
        trains = []
        for proc in procs:
            stdout, _ = proc.communicate(timeout=900)
            codes.append(proc.returncode)
            for line in stdout.splitlines():
                if line.startswith("PROBE "):
                    trains.append(json.loads(line[6:])["train_handler_s"])
        out[prefix + "processes"] = args.nodes
        out[prefix + "wall_s"] = round(time.perf_counter() - t, 3)
        out[prefix + "train_handler_s"] = trains
        out[prefix + "train_handler_median_s"] = median(trains)
    out["ok"] = rc == 0 and not any(codes)
    print(f"[flwr-overhead] probe {setting} r{rep}: {json.dumps(out)}", flush=True)
    return out


def probe_worker(spec: dict[str, Any]) -> int:
    """``--probe-worker``: in a fresh process, ``import client_app``, then node 0's partition,
    one train and one evaluate through the ClientApp's handlers (as a train message runs them),
    then the same train again (what a process that served several messages would pay)."""
    sys.path.insert(0, ROOT)
    t0 = time.perf_counter()
    import client_app  # noqa: F401

    t1 = time.perf_counter()
    import torch
    from flwr.app import ConfigRecord, RecordDict

    from flux_app.common.records import to_record
    from flux_app.engine.client import ClientRuntime, handle_evaluate, handle_train, new_model
    from flux_app.engine.config import RunConfig

    cfg = RunConfig.from_mapping(spec["config"])
    rt = ClientRuntime(cfg, int(spec.get("partition", 0)), int(spec["nodes"]))
    _ = rt.data
    t2 = time.perf_counter()
    arrays = to_record(new_model(cfg, seed=0).state_dict())
    config = ConfigRecord({"server-round": 1})
    reply = handle_train(RecordDict({"arrays": arrays, "config": config}), rt)
    t3 = time.perf_counter()
    handle_evaluate(RecordDict({"arrays": reply["arrays"], "config": config}), rt)
    t4 = time.perf_counter()
    if spec.get("again", True):  # warm: not a new process
        handle_train(RecordDict({"arrays": arrays, "config": config}), rt)
    t5 = time.perf_counter()
    report = {
        "in_process_import_client_app_s": round(t1 - t0, 3),
        "partition_s": round(t2 - t1, 3),
        "train_handler_s": round(t3 - t2, 3),
        "evaluate_handler_s": round(t4 - t3, 3),
        "train_handler_again_s": round(t5 - t4, 3) if spec.get("again", True) else None,
        "torch_threads": torch.get_num_threads(),
        "num_train": len(rt.data.y_train),
        "epochs": cfg.epochs,
    }
    print("PROBE " + json.dumps(report), flush=True)
    return 0


def warm_partitions(config: dict[str, Any], nodes: int) -> float:
    """Build (or load) every node's partition once, untimed, so no measured run pays the build
    into the node-side partition cache that all three paths share."""
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r})\n"
        "from flux_app.engine.client import ClientRuntime\n"
        "from flux_app.engine.config import RunConfig\n"
        f"cfg = RunConfig.from_mapping({config!r})\n"
        f"[ClientRuntime(cfg, p, {nodes}).data for p in range({nodes})]\n"
    )
    t = time.perf_counter()
    subprocess.run([PY, "-c", code], cwd=ROOT, env=child_env(), check=True, timeout=1800)
    return round(time.perf_counter() - t, 3)


# ----------------------------------------------------------------------------- report
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for setting in dict.fromkeys(r["setting"] for r in runs):
        mine = [r for r in runs if r["setting"] == setting and r["ok"]]
        modes: dict[str, Any] = {}
        for mode in MODES:
            rs = [r for r in mine if r["mode"] == mode]
            if not rs:
                continue
            pooled = [s for r in rs for s in r["rounds_s"][1:]]
            modes[mode] = {
                "repeats": len(rs),
                "startup_s": [r["startup_s"] for r in rs],
                "round1_s": [r["round1_s"] for r in rs],
                "rounds_2_on_median_s": [r["rounds_2_on_median_s"] for r in rs],
                "rounds_2_on_pooled_median_s": median(pooled),
                "wall_s": [r["wall_s"] for r in rs],
                "outside_rounds_s": [r["outside_rounds_s"] for r in rs],
            }
        ratios: dict[str, Any] = {}
        for num, den in (
            ("flwr-run", "bare"),
            ("deploy", "flwr-run"),
            ("deploy-flower", "flwr-run"),
            ("deploy", "bare"),
        ):
            if num in modes and den in modes:
                per_round, wall = [], []
                for rep in sorted({r["repeat"] for r in mine}):
                    a = next((r for r in mine if r["mode"] == num and r["repeat"] == rep), None)
                    b = next((r for r in mine if r["mode"] == den and r["repeat"] == rep), None)
                    if a and b and a["rounds_2_on_median_s"] and b["rounds_2_on_median_s"]:
                        per_round.append(a["rounds_2_on_median_s"] / b["rounds_2_on_median_s"])
                        wall.append(a["wall_s"] / b["wall_s"])
                ratios[f"{num}/{den}"] = {
                    "per_round_by_repeat": [round(x, 3) for x in per_round],
                    "per_round_median": round(median(per_round), 3) if per_round else None,
                    "wall_by_repeat": [round(x, 3) for x in wall],
                    "wall_median": round(median(wall), 3) if wall else None,
                }
        out[setting] = {"modes": modes, "ratios": ratios}
    return out


def markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    rounds = record["rounds"]
    lines = [
        "## `flwr run` and a loopback deployment against a bare loop (issue #15)",
        "",
        f"Command: `{record['command']}` ({record['elapsed_s'] / 60:.1f} min). Machine: "
        f"{m['nproc']} cores (nproc), Python {m['python']}, torch {m['torch']}, flwr {m['flwr']}, "
        f"ray {m['ray']}, shared with other jobs (load average at the start "
        f"{m['loadavg_start'][0]:.2f}). {record['nodes']} nodes, {rounds} rounds; "
        "paths run alternately (A B C A B C ...). *bare* = `bare_fedavg` (scripts/overhead.py) "
        f"in a fresh process, {record['bare_threads']} torch thread; *flwr run* = "
        "`scripts/simulate.py` (Ray, 1 CPU per client); *deployment* = "
        "`scripts/deploy_local.sh` (SuperLink + SuperNodes + `flwr run`, insecure, loopback; "
        "warm ClientApps forked by `flux_app.deploy.warm_exec`, SuperNode pauses capped at "
        "0.3 s by `flux_app.deploy.supernode`, task polls every 0.3 s); *deployment, Flower's "
        "pace* = the same with `--clientapp cold --node-poll flower` and "
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=1 (a fresh `flwr-clientapp` program per message, "
        "Flower's 3 s / 0.5 s / 1 s pauses); both give each node cores / nodes torch threads. "
        "Start-up = launch to round 1's begin; per round = median of rounds 2.."
        f"{rounds} (round 1 apart); a cell with repeats shows median (min-max).",
        "",
        "| setting | path | start-up (s) | round 1 (s) | rounds 2..R (s) | wall (s) | per-round ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, s in record["summary"].items():
        for mode, v in s["modes"].items():
            ratio = "-"
            key = {
                "flwr-run": "flwr-run/bare",
                "deploy": "deploy/flwr-run",
                "deploy-flower": "deploy-flower/flwr-run",
            }.get(mode)
            if key and key in s["ratios"] and s["ratios"][key]["per_round_median"] is not None:
                den = "bare" if mode == "flwr-run" else "flwr run"
                ratio = f"{s['ratios'][key]['per_round_median']:.2f}x {den}"
                if mode == "deploy" and "deploy/bare" in s["ratios"]:
                    ratio += f" ({s['ratios']['deploy/bare']['per_round_median']:.1f}x bare)"
            lines.append(
                f"| {setting} | {MODE_TITLE[mode]} | {spread(v['startup_s'])} | "
                f"{spread(v['round1_s'])} | {spread(v['rounds_2_on_median_s'], 2)} | "
                f"{spread(v['wall_s'])} | {ratio} |"
            )
    failed = [r for r in record["runs"] if not r["ok"]]
    if failed:
        lines += [
            "",
            "Failed runs (not in the table): "
            + ", ".join(
                f"{r['setting']} {r['mode']} repeat {r['repeat']} (rc {r['rc']})" for r in failed
            ),
        ]
    deploys = [
        r
        for r in record["runs"]
        if r["mode"].startswith("deploy") and r["ok"] and r.get("breakdown")
    ]
    nodes = record["nodes"]
    if deploys:
        lines += [
            "",
            "Where a deployment round goes (rounds 2..R, median over rounds and repeats), from "
            "the SuperNode logs time-stamped as they were written: messages and `flwr-clientapp` "
            "processes per node per round, a node's seconds per message (received -> reply "
            "sent: the ClientApp process's start, import, work and reply), and the seconds of "
            "the round when no node had a message in hand (server work and polling).",
            "",
            "| setting | path | round (s) | msgs / node | clientapps / node | s / train msg | "
            "s / evaluate msg | s / query msg | no node busy (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for setting, mode in dict.fromkeys((r["setting"], r["mode"]) for r in deploys):
            rows = [
                row
                for r in deploys
                if r["setting"] == setting and r["mode"] == mode
                for k, row in r["breakdown"]["rounds"].items()
                if int(k) >= 2
            ]

            def per_type(prefix: str, rows: list[dict] = rows) -> str:
                vals = [
                    e["node_seconds_per_message_median"]
                    for row in rows
                    for t, e in row["by_type"].items()
                    if t.startswith(prefix)
                ]
                return fmt(median(vals), 2)

            lines.append(
                f"| {setting} | {MODE_TITLE[mode]} | {fmt(median([r['seconds'] for r in rows]))} | "
                f"{fmt(median([r['messages_per_node'] for r in rows]))} | "
                f"{fmt(median([r['clientapp_processes'] / nodes for r in rows]))} | "
                f"{per_type('train')} | {per_type('evaluate')} | {per_type('query')} | "
                f"{fmt(median([r['no_node_busy_s'] for r in rows]))} |"
            )
    probes = [p for p in record["probes"] if p.get("ok")]
    if probes:
        lines += [
            "",
            "What a ClientApp process pays, in fresh processes (seconds): `python -c pass`, "
            '`flwr-clientapp --help`, `python -c "import client_app"`; then, after that import, '
            "one train handler call on node 0's partition with torch's default threads (as a "
            "`flwr-clientapp` process has them), the same call again in that process, the first "
            "call in a process with OMP_NUM_THREADS=1 (as Ray gives a 1-CPU actor), one evaluate "
            f"call; and {nodes} such processes training at once (one per node, as a deployment "
            "round's train messages on one machine): median train call, default threads and "
            "OMP_NUM_THREADS=1.",
            "",
            "| setting | python | flwr-clientapp --help | import client_app | train | again | "
            "train, 1 thread | evaluate | "
            f"{nodes} at once: train | {nodes} at once: train, 1 thread |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in probes:
            cells = [
                p.get(k)
                for k in (
                    "python_pass_s",
                    "flwr_clientapp_help_s",
                    "import_client_app_s",
                    "train_handler_s",
                    "train_handler_again_s",
                    "omp1_train_handler_s",
                    "evaluate_handler_s",
                    "concurrent_train_handler_median_s",
                    "concurrent_omp1_train_handler_median_s",
                )
            ]
            lines.append(f"| {p['setting']} | " + " | ".join(fmt(c, 2) for c in cells) + " |")
    lines += ["", f"Raw numbers: docs/benchmarks/{os.path.basename(record['output'])}."]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "?"

    return {
        "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout or 0),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "flwr": version("flwr"),
        "ray": version("ray"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# ----------------------------------------------------------------------------- main
def parse_settings(text: str, repeats: int) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, reps = item.partition(":")
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
        out.append((name, int(reps) if reps else repeats))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Settings: "
        + "; ".join(f"{k}: {render(c)} ({', '.join(m)})" for k, (c, m) in SETTINGS.items()),
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help="comma list of settings, each optionally NAME:REPEATS (default: all)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(MODES),
        help=f"comma list of paths to run where a setting has them (default: {','.join(MODES)})",
    )
    parser.add_argument("--repeats", type=int, default=2, help="repeats per setting (default 2)")
    parser.add_argument("--nodes", type=int, default=5, help="nodes / SuperNodes (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="num-server-rounds (default 3)")
    parser.add_argument(
        "--workdir", help="folder for logs, FLWR_HOMEs and outputs (default: a fresh /tmp folder)"
    )
    parser.add_argument("--output", default=OUT, help=f"JSON file (default {OUT})")
    parser.add_argument(
        "--timeout", type=int, default=900, help="seconds one run may take (default 900)"
    )
    parser.add_argument(
        "--bare-threads", type=int, default=1, help="torch threads of the bare loop (default 1)"
    )
    parser.add_argument(
        "--no-probe", action="store_true", help="skip the ClientApp probe (run after repeat 1)"
    )
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)
    parser.add_argument("--probe-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        return bare_worker(json.loads(args.bare_worker))
    if args.probe_worker:
        return probe_worker(json.loads(args.probe_worker))

    plan = parse_settings(args.settings, args.repeats)
    args.workdir = os.path.abspath(
        args.workdir or tempfile.mkdtemp(prefix="flwr-overhead.", dir=tempfile.gettempdir())
    )
    if os.path.commonpath([args.workdir, ROOT]) == ROOT:
        raise SystemExit("--workdir must be outside the repository (flwr run packs the app folder)")
    os.makedirs(args.workdir, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.time()
    record: dict[str, Any] = {
        "command": "python scripts/flwr_overhead.py " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "nodes": args.nodes,
        "rounds": args.rounds,
        "bare_threads": args.bare_threads,
        "workdir": args.workdir,
        "output": args.output,
        "partition_cache": os.environ.get("FLUX_APP_PARTITION_CACHE")
        or "~/.cache/flux-app/partitions (default)",
        "settings": {
            name: {
                "run_config": render(SETTINGS[name][0] | {"num-server-rounds": args.rounds}),
                "paths": list(SETTINGS[name][1]),
                "repeats": reps,
            }
            for name, reps in plan
        },
        "warmup_s": {},
        "runs": [],
        "probes": [],
    }
    print(f"[flwr-overhead] work folder {args.workdir}", flush=True)
    try:
        for name, reps in plan:
            config, modes = SETTINGS[name]
            modes = tuple(m for m in modes if m in args.paths.split(","))
            config = config | {"num-server-rounds": args.rounds}
            record["warmup_s"][name] = warm_partitions(config, args.nodes)
            for rep in range(1, reps + 1):
                for mode in modes:
                    if mode == "bare":
                        run = run_bare(name, rep, config, args)
                    else:
                        run = run_flwr(mode, name, rep, config, args)
                    record["runs"].append(run)
                    print(
                        f"[flwr-overhead] {name} {mode} r{rep}: ok={run['ok']} "
                        f"wall {run['wall_s']:.1f} s, start-up {fmt(run['startup_s'])} s, "
                        f"rounds {run['rounds_s']}",
                        flush=True,
                    )
                    if run["leftovers_stopped"]:
                        print(f"[flwr-overhead] stopped leftovers: {run['leftovers_stopped']}")
                if not args.no_probe and "deploy-flower" in modes and rep == 1:
                    record["probes"].append(run_probe(name, rep, config, args))
    finally:
        record["elapsed_s"] = round(time.time() - t_start, 1)
        record["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record["summary"] = summarise(record["runs"])
        late = [x for t in TRACKERS for x in stop_leftovers(t, grace=5)]
        record["leftovers_stopped_total"] = sum(
            len(r["leftovers_stopped"]) for r in record["runs"]
        ) + len(late)
        record["leftovers_stopped_at_exit"] = late
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as fh:
            json.dump(record, fh, indent=2)
            fh.write("\n")
    print()
    print(markdown(record))
    return 0 if all(r["ok"] for r in record["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
