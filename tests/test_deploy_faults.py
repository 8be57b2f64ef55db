"""Faults on a real loopback deployment (scripts/fault_drill.py, small): a SuperNode killed
mid-run and restarted rejoins and trains; a ServerApp killed mid-run and resumed with
``resume-from`` ends with the numbers of an uninterrupted run. Loopback only, free ports, every
process stopped by process group (the drill's ``Loopback.stop``).

Passed on 2 cores in 293 s (4 rounds, round-timeout 20). The same faults are tested in process
in every run of the suite (tests/test_resume.py)."""

from __future__ import annotations

import importlib.util
import os

import pytest
from deploy_helpers import flower_processes_mentioning, kill_all

#: about 5 minutes on 2 cores (a deployment message starts a process): opt-in, so the suite stays
#: within its budget; `FLUX_DEPLOY_DRILL=1 bash scripts/test.sh tests/test_deploy_faults.py`
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FLUX_DEPLOY_DRILL") != "1",
        reason="loopback fault drill (~5 min): set FLUX_DEPLOY_DRILL=1 to run it",
    ),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _drill():
    spec = importlib.util.spec_from_file_location(
        "flux_fault_drill", os.path.join(ROOT, "scripts", "fault_drill.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_lost_node_rejoins_and_a_killed_server_resumes(tmp_path):
    drill = _drill()
    args = drill.parse_args(
        [
            "--nodes", "2",
            "--rounds", "4",
            "--round-timeout", "20",
            "--local-epochs", "1",
            "--kill-node-round", "2",
            "--kill-server-round", "3",
            "--workdir", str(tmp_path),
        ]
    )  # fmt: skip
    try:
        report = drill.run_drill(args)
    finally:
        left = flower_processes_mentioning([str(tmp_path)])
        kill_all(left)
    assert not left, f"processes left running: {left}"
    assert not report["failed"], report["failed"]
    loss = report["node_loss"]
    # the lost round waited about one round-timeout for the dead node, not one per message
    assert loss["lost_round_seconds"] <= 20 + 30, loss
    assert loss["rounds_back"], loss
    crash = report["server_crash"]
    assert crash["resumed"][0]["after_round"] == 2 and all(crash["equal"].values()), crash
