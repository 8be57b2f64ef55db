"""flux_app.deploy.warm_exec: Flower's SuperExec with ClientApp processes forked from a warm zygote.

The loopback deployment tests (test_deploy_local, test_deploy_secure) run every message through
it (deploy_local.sh's default --clientapp warm); these tests pin the pieces: the command line a
task process gets is Flower's own, the seam in Flower still exists, and the zygote forks one
process per task line, ignores malformed lines and leaves when its pipe closes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from flux_app.deploy import warm_exec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(**over):
    spec = {
        "runtime_api_address": "127.0.0.1:9094",
        "token": "ab" * 32,
        "insecure": True,
        "root_certificates_path": None,
        "parent_pid": 4242,
        "runtime_dependency_install": False,
        "suppress_output": False,
    }
    spec.update(over)
    return spec


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"insecure": False, "root_certificates_path": "/pki/ca.crt"},
        {"insecure": False, "parent_pid": None, "runtime_dependency_install": True},
    ],
)
def test_task_command_line_is_flowers_own(monkeypatch, over):
    """What a forked task runs is exactly the flwr-clientapp command Flower's executor builds."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    seen = []
    monkeypatch.setattr(
        subprocess_executor.subprocess, "Popen", lambda args, **kw: seen.append(args)
    )
    spec = _spec(**over)
    subprocess_executor.SubprocessExecutor().launch(
        ExecutionSpec(task_type=TaskType.CLIENT_APP, task_id=1, **spec)
    )
    assert warm_exec.clientapp_argv(spec) == seen[0]


def test_flowers_seam_is_there():
    """The one thing warm_exec replaces: run_superexec looks its executor up by this name."""
    import flwr.supercore.superexec.run_superexec as loop

    assert callable(loop.get_executor)
    assert set(warm_exec.SPEC_FIELDS) <= set(
        __import__(
            "flwr.supercore.superexec.executor.types", fromlist=["ExecutionSpec"]
        ).ExecutionSpec.__dataclass_fields__
    )


def test_preload_option_is_taken_out_of_superexec_arguments():
    preload, rest = warm_exec._take_preload(
        ["--insecure", "--preload", "numpy,torch", "--runtime-api-address", "h:1"]
    )
    assert preload == ["numpy", "torch"] and rest == ["--insecure", "--runtime-api-address", "h:1"]
    preload, rest = warm_exec._take_preload(["--preload=json", "--insecure"])
    assert preload == ["json"] and rest == ["--insecure"]
    assert warm_exec._take_preload([])[0] == list(warm_exec.DEFAULT_PRELOAD)


def test_zygote_forks_one_process_per_task_and_leaves_on_eof(tmp_path):
    """Each task line runs in its own child of the zygote (not in the zygote, not a new program),
    a malformed line starts nothing, and closing the pipe ends the zygote."""
    code = (
        "import os, sys, json\n"
        "import flux_app.deploy.warm_exec as w\n"
        "def task(spec):\n"
        "    with open(spec['token'], 'w') as fh:\n"
        "        json.dump({'pid': os.getpid(), 'ppid': os.getppid(),\n"
        "                   'argv': w.clientapp_argv(spec), 'stdin': os.read(0, 10).decode(),\n"
        "                   'torch_threads': sys.modules['torch'].get_num_threads()}, fh)\n"
        "    return 0\n"
        "w._run_task = task\n"
        "sys.exit(w.zygote_main(['json', 'torch'], int(sys.argv[1])))\n"
    )
    ack_read, ack_write = os.pipe()
    zygote = subprocess.Popen(
        [sys.executable, "-c", code, str(ack_write)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        pass_fds=(ack_write,),
    )
    os.close(ack_write)
    outs = [tmp_path / f"task{i}.json" for i in range(3)]
    try:
        lines = [json.dumps(_spec(token=str(outs[0]))), "not json", json.dumps({"evil": 1})]
        lines += [json.dumps(_spec(token=str(p))) for p in outs[1:]]
        zygote.stdin.write(("\n".join(lines) + "\n").encode())
        zygote.stdin.flush()
        deadline = time.monotonic() + 30
        while not all(p.exists() and p.stat().st_size for p in outs):
            assert time.monotonic() < deadline, "tasks did not run"
            time.sleep(0.05)
        zygote.stdin.close()
        assert zygote.wait(timeout=10) == 0
        with os.fdopen(ack_read, "rb") as fh:
            acks = fh.read().decode().split()
    finally:
        if zygote.poll() is None:
            zygote.kill()
    tasks = [json.loads(p.read_text()) for p in outs]
    pids = [int(a) for a in acks if a.isdigit()]
    assert acks[0] == "ready" and acks.count("bad") == 2 and pids == [t["pid"] for t in tasks]
    assert len({t["pid"] for t in tasks}) == 3
    assert all(t["ppid"] == zygote.pid and t["pid"] != zygote.pid for t in tasks)
    assert tasks[0]["argv"][:2] == ["flwr-clientapp", "--runtime-api-address"]
    assert all(t["stdin"] == "" for t in tasks)  # the task pipe is not the task's stdin
    # torch was warmed up on one thread in the zygote; each task has the node's thread count back
    fresh = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(t["torch_threads"] == int(fresh.stdout) for t in tasks)
    log = zygote.stderr.read().decode()
    assert log.count("ignored a malformed task line") == 2 and "torch warmed up" in log


def test_no_task_is_lost_when_the_zygote_cannot_start(monkeypatch):
    """A zygote that dies at start-up: the executor says so and starts ClientApps cold."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supercore.superexec.executor.types import (
        ExecutionSpec,
        LaunchResult,
        LaunchResultStatus,
    )

    cold = []
    monkeypatch.setattr(
        subprocess_executor.SubprocessExecutor,
        "launch",
        lambda self, spec: cold.append(spec.task_id) or LaunchResult.accepted(),
    )
    monkeypatch.setattr(warm_exec.WarmClientAppExecutor, "MODULE", "flux_app.no_such_module")
    executor = warm_exec.WarmClientAppExecutor(["json"], ready_timeout=60)
    try:
        assert executor.zygote is None
        for task_id in (7, 8):
            spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, task_id=task_id, **_spec())
            assert executor.launch(spec).status == LaunchResultStatus.ACCEPTED
    finally:
        executor.close()
    assert cold == [7, 8]
