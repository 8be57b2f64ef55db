"""scripts/ray_cluster.sh: a FLUX simulation on a two-node Ray cluster (a head and a worker node,
started with ``ray start`` on loopback, one CPU each) runs to finished:completed, its ClientApp
actors run on both Ray nodes (two distinct node ids in Ray's GCS, ClientAppActor.run tasks
executed on each), and no process of the cluster is left afterwards.

Took 35-45 s on 2 busy cores (4 SuperNodes, 2 rounds, synthetic data), so it runs with the
suite (marked slow, like tests/test_e2e_flwr.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile

import pytest
from deploy_helpers import stop_session

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "ray_cluster.sh")
RAY = os.path.join(ROOT, ".venv", "bin", "ray")


def _processes_mentioning(needle: str) -> list[tuple[int, str]]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.append((int(pid), cmd))
    return found


@pytest.mark.skipif(not os.access(RAY, os.X_OK), reason=f"the ray CLI is missing ({RAY})")
@pytest.mark.skipif(shutil.which("setsid") is None, reason="setsid (util-linux) is missing")
def test_clients_run_on_both_nodes_of_a_ray_cluster():
    # Ray's unix sockets live under the work folder and their paths may not pass 107 bytes, so a
    # short folder directly under /tmp rather than pytest's tmp_path
    workdir = tempfile.mkdtemp(prefix="fxr-", dir="/tmp")
    try:
        proc = subprocess.Popen(
            ["bash", SCRIPT, "--workdir", workdir, "--nodes", "4", "--rounds", "2"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            stop_session(proc, grace=60)  # SIGTERM: the script's trap stops both Ray nodes
            output, _ = proc.communicate(timeout=60)
            pytest.fail("scripts/ray_cluster.sh took more than 240 s:\n" + output[-6000:])
        left = _processes_mentioning(workdir)
        for pid, _ in left:  # keep the machine clean even when an assertion below fails
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        assert proc.returncode == 0, output[-6000:]
        assert not left, f"processes of the Ray cluster still running: {left}"
        assert "no process of theirs is left" in output

        with open(os.path.join(workdir, "out", "ray-cluster", "results.json")) as fh:
            results = json.load(fh)
        assert results.get("final"), "results.json has no final section"

        with open(os.path.join(workdir, "evidence.json")) as fh:
            evidence = json.load(fh)
        nodes = evidence["nodes"]
        assert sorted(n["kind"] for n in nodes.values()) == ["head", "worker"]
        assert len({n["ip"] for n in nodes.values()}) == 2
        actors = evidence["client_app_actors"]
        actor_nodes = {a["node_id"] for a in actors}
        assert len(actor_nodes) == 2 and actor_nodes <= set(nodes), actors
        runs = evidence["client_app_run_tasks_per_node"]
        assert set(runs) == set(nodes) and all(c > 0 for c in runs.values()), runs
        assert all(evidence["actor_worker_logs"][k] for k in ("head", "worker"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
