#!/usr/bin/env python
"""Run one flux-app simulation through ``flwr run`` and check that it really finished.

``flwr run . --stream`` exits 0 even when the run failed, so this driver reads the run id from
its output, asks ``flwr ls --run-id ID --format json`` for ``finished:completed``, and exits
non-zero otherwise. It sets the environment Flower needs on these machines (private FLWR_HOME,
no runtime dependency install, no telemetry) and gives every run an absolute output folder.

Examples
--------
    python scripts/simulate.py --nodes 12 -c 'strategy="oracle" num-server-rounds=8'
    python scripts/simulate.py --nodes 10 -c conf/flux-fmnist-px-L4.toml -c 'seed=1'
    python scripts/simulate.py --nodes 10 --gpus-per-node 0.25 -c 'device="cuda"'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flower_env(flwr_home: str) -> dict[str, str]:
    """Environment for flwr commands: private home, offline-friendly settings."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=flwr_home,
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        # an actor that reserved no GPU (client-resources-num-gpus = 0) must not see one: Ray
        # hides it (CUDA_VISIBLE_DEVICES="") only while this is on; "0" let every CPU actor
        # with device="auto" land on cuda:0 unreserved
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="1",
    )
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def run_status(run_id: str, env: dict[str, str]) -> str:
    """``finished:completed`` etc., from ``flwr ls``; empty string when unknown."""
    proc = subprocess.run(
        ["flwr", "ls", "--run-id", run_id, "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        return json.loads(proc.stdout)["runs"][0]["status"]
    except (ValueError, KeyError, IndexError):
        return ""


def stop_local_superlink(flwr_home: str) -> int:
    """Stop the local SuperLink (and its executor) that ``flwr run`` started for ``flwr_home``.

    Only the SuperLink whose command line names this FLWR_HOME, and its executor, are touched;
    waits (up to 20 s) until they are gone.
    """
    links = [pid for pid, cmd in _processes() if "flower-superlink" in cmd and flwr_home in cmd]
    # The SuperLink's executor runs in its own session and names only its parent's pid.
    execs = [
        pid
        for pid, cmd in _processes()
        if "flower-superexec" in cmd and any(f"--parent-pid {p}" in cmd for p in links)
    ]
    victims = links + execs
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 20
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in victims):
        time.sleep(0.2)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)


def _processes() -> list[tuple[int, str]]:
    """(pid, command line) of every live process."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                out.append((int(pid), fh.read().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            continue
    return out


def simulate(
    overrides: list[str],
    *,
    nodes: int,
    cpus_per_node: float = 1.0,
    gpus_per_node: float = 0.0,
    flwr_home: str | None = None,
    timeout: float = 3600.0,
    quiet: bool = False,
) -> tuple[str, str, str]:
    """Run ``flwr run . --stream`` with ``overrides``; return (run id, status, results path).

    Each override is either a TOML file (``conf/*.toml``) or ``'key=value ...'`` text. An
    ``output-dir`` and a ``run-name`` are added unless given, so the results can be found.
    """
    flwr_home = os.path.abspath(
        flwr_home or os.environ.get("FLUX_APP_FLWR_HOME", os.path.join(ROOT, ".flwr-home"))
    )
    env = flower_env(flwr_home)
    joined = " ".join(o for o in overrides if not o.endswith(".toml"))
    extra = []
    if "output-dir" not in joined:
        extra.append(f'output-dir="{os.path.join(ROOT, "outputs")}"')
    run_name = re.search(r'run-name\s*=\s*"([^"]+)"', joined)
    if run_name is None:
        name = "sim-" + time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        extra.append(f'run-name="{name}"')
    cmd = ["flwr", "run", ".", "--stream", "--federation-config"]
    # Flower wants integers where the value is whole ("1", not "1.0").
    cpus = int(cpus_per_node) if float(cpus_per_node).is_integer() else cpus_per_node
    resources = f"num-supernodes={nodes} client-resources-num-cpus={cpus}"
    if gpus_per_node:
        resources += f" client-resources-num-gpus={gpus_per_node}"
    cmd.append(resources)
    for o in overrides + ([" ".join(extra)] if extra else []):
        cmd += ["-c", o]
    if not quiet:
        print("[simulate] " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_id, results = "", ""
    # A watchdog, so that a run that hangs without printing is stopped too.
    killed = threading.Event()

    def _kill() -> None:
        killed.set()
        proc.kill()

    watchdog = threading.Timer(timeout, _kill)
    watchdog.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if not quiet:
                sys.stdout.write(line)
                sys.stdout.flush()
            if m := re.search(r"started run (\d+)", line):
                run_id = m.group(1)
            if m := re.search(r"results written to (\S+)", line):
                results = m.group(1)
        proc.wait()
    finally:
        watchdog.cancel()
    if not run_id:
        return "", "not-started", ""
    if killed.is_set():  # the log stream was cut: stop the run itself too
        subprocess.run(["flwr", "stop", run_id], cwd=ROOT, env=env, capture_output=True, timeout=60)
    status = ""
    for _ in range(30):  # the status may lag the end of the log stream by a moment
        status = run_status(run_id, env)
        if status.startswith("finished"):
            break
        time.sleep(2)
    return run_id, status, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10, help="simulated SuperNodes (default 10)")
    parser.add_argument(
        "--cpus-per-node", type=float, default=1.0, help="CPUs reserved per client (default 1)"
    )
    parser.add_argument(
        "--gpus-per-node", type=float, default=0.0, help="GPU share per client, e.g. 0.25"
    )
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        help="'key=value ...' or a TOML file; repeatable",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")
    parser.add_argument(
        "--stop-superlink", action="store_true", help="stop the local SuperLink afterwards"
    )
    args = parser.parse_args()
    flwr_home = os.path.abspath(
        os.environ.get("FLUX_APP_FLWR_HOME", os.path.join(ROOT, ".flwr-home"))
    )
    try:
        run_id, status, results = simulate(
            args.run_config,
            nodes=args.nodes,
            cpus_per_node=args.cpus_per_node,
            gpus_per_node=args.gpus_per_node,
            flwr_home=flwr_home,
            timeout=args.timeout,
        )
    finally:
        if args.stop_superlink:
            stop_local_superlink(flwr_home)
    print(f"[simulate] run {run_id or '?'}: {status or 'unknown status'}")
    if status != "finished:completed":
        print("[simulate] the run did not complete; see the log above", file=sys.stderr)
        return 1
    if results and os.path.exists(results):
        with open(results) as fh:
            final = json.load(fh).get("final") or {}
        shown = {
            k: final.get(k)
            for k in (
                "accuracy_known",
                "accuracy_routed",
                "accuracy_holdout",
                "num_clusters",
                "ari",
                "wall_seconds",
            )
        }
        print(f"[simulate] final: {json.dumps(shown)}")
        print(f"[simulate] results: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
