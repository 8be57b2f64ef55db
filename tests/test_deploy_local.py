"""scripts/deploy_local.sh: a real loopback deployment (1 SuperLink + 3 SuperNodes) runs the app
to finished:completed and leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "deploy_local.sh")
FLOWER_PROCESSES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")


def _flower_processes_mentioning(needles: list[str]) -> list[tuple[int, str]]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(p in cmd for p in FLOWER_PROCESSES) and any(n in cmd for n in needles):
            found.append((int(pid), cmd))
    return found


def test_deploy_local_three_supernodes(tmp_path):
    out_dir = tmp_path / "out"
    workdir = tmp_path / "deploy"
    cmd = [
        "bash",
        SCRIPT,
        "-n",
        "3",
        "-c",
        f'num-server-rounds=2 output-dir="{out_dir}" run-name="deploy-test"',
        "--timeout",
        "420",
        "--workdir",
        str(workdir),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script's trap stops what it started
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"deploy_local.sh did not finish in time:\n{output[-4000:]}")

    link = re.search(r"superlink up on 127\.0\.0\.1:(\d+)", output)
    nodes = re.search(r"supernodes up \(pids [\d ]+, runtime ports ([\d ]+)\)", output)
    needles = [str(workdir)]
    if link:
        needles.append(f"127.0.0.1:{link.group(1)}")
    if nodes:
        needles += [f"127.0.0.1:{p}" for p in nodes.group(1).split()]
    left = _flower_processes_mentioning(needles)
    for pid, _ in left:  # keep the machine clean even when the assertion below fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    assert proc.returncode == 0, output[-4000:]
    assert link and nodes, output[-4000:]
    assert "[deploy] 3 supernodes up" in output
    assert re.search(r"\[deploy\] run \d+: finished:completed", output), output[-4000:]
    assert not left, f"processes left behind: {left}"

    results = out_dir / "deploy-test" / "results.json"
    assert f"[deploy] results: {results}" in output
    data = json.loads(results.read_text())
    assert [row["round"] for row in data["rounds"]] == [1, 2]
    assert data["run_config"]["dataset"] == "digits"
    assert data["final"]["accuracy_known"] is not None
