"""scripts/deploy_local.sh: a real loopback deployment (1 SuperLink + 6 SuperNodes, each with its
own data folder) runs the app to finished:completed and leaves no process behind."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from deploy_helpers import flower_processes_mentioning, kill_all

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "deploy_local.sh")


def test_deploy_six_sites_with_their_own_data(tmp_path):
    """The deployment of the real-data issue: 6 SuperNodes on loopback, each with its own folder
    of images (digits in two rotation groups), one of them unlabeled-only. FLUX finds the two
    groups, routes the unlabeled site to its group's cluster, and the site's predictions.csv
    beats chance; the ServerApp's run-config names a dataset that cannot be loaded anywhere
    (mnist under a missing data-root, offline), so the run completes only if it never opens one."""
    sites = tmp_path / "sites"
    export = [
        sys.executable,
        os.path.join(ROOT, "scripts", "export_partitions.py"),
        "--dataset",
        "digits",
        "--shift",
        "px",
        "--level",
        "1",
        "--nodes",
        "6",
        "--holdout",
        "1",
        "--unlabeled",
        "--out",
        str(sites),
    ]
    subprocess.run(export, cwd=ROOT, check=True, capture_output=True, timeout=300)
    out_dir = tmp_path / "out"
    workdir = tmp_path / "deploy"
    overrides = (
        'strategy="flux" dataset="mnist" data-root="/nonexistent/no-dataset" channels=3 '
        "num-server-rounds=2 flux-cluster-round=1 local-epochs=20 lr=0.05 momentum=0.5 "
        f'eval-every=2 device="cpu" output-dir="{out_dir}" run-name="sites"'
    )
    cmd = ["bash", SCRIPT, "--data-dir", str(sites), "-c", overrides, "--timeout", "600",
           "--workdir", str(workdir)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=720)
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
    left = flower_processes_mentioning(needles)
    kill_all(left)  # keep the machine clean even when the assertion below fails

    assert proc.returncode == 0, output[-4000:]
    assert "[deploy] 6 supernodes up" in output
    assert re.search(r"\[deploy\] run \d+: finished:completed", output), output[-4000:]
    assert not left, f"processes left behind: {left}"

    data = json.loads((out_dir / "sites" / "results.json").read_text())
    final = data["final"]
    groups = {f"node_{i}": int((sites / f"node_{i}" / "group.txt").read_text()) for i in range(6)}
    assert final["num_clusters"] == 2 and final["ari"] == pytest.approx(1.0)  # from group.txt
    home = {data["clustering"]["assignment"][n]: g for n, g in groups.items() if n != "node_5"}
    assert home[final["holdout_assignment"]["node_5"]] == groups["node_5"]  # routed home
    assert final["routing_accuracy"] == 1.0 and final["served_largest"] == []
    with open(sites / "node_5" / "labels.csv") as fh:
        truth = {r["file"]: int(r["label"]) for r in csv.DictReader(fh)}
    with open(sites / "node_5" / "flux-app" / "sites" / "predictions.csv") as fh:
        pred = {r["file"]: int(r["label"]) for r in csv.DictReader(fh)}
    assert pred.keys() == truth.keys()
    assert sum(pred[f] == truth[f] for f in truth) / len(truth) > 0.3  # chance: 0.1
    for i in range(6):  # every site got its cluster's model
        state = torch.load(
            sites / f"node_{i}" / "flux-app" / "sites" / "model.pt", weights_only=True
        )
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())
