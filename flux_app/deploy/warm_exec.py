"""A SuperExec whose ClientApp processes start warm.

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process, started
by the node's SuperExec (``flower-superexec``: ``SubprocessExecutor.launch``). That process
imports torch and the app before it can train for a second, and the SuperExec only polls for
tasks once a second. Flower's warm executor pools are for Kubernetes only (pre-started pods, one
task each); there is no long-lived ClientApp.

This module is Flower's own ``flower-superexec`` (same command line, same task loop, same
``flwr-clientapp`` entry point in every task process) with one change: a ClientApp task is not
started as a new program but forked from a *zygote*, a helper process that imported the heavy
third-party modules (numpy, torch, Flower's runtime) once. Each task still runs in its own process,
with its own token, exactly as ``flwr-clientapp`` would, and exits when its message is answered:
isolation between messages is kept, only the import cost goes. The app's own code (``client_app``
and its package, from the FAB) is never preloaded, so a new FAB version is always the one that
runs. Other task types fall back to Flower's ``SubprocessExecutor``.

The zygote is started with ``subprocess`` (a fresh interpreter: no threads are inherited, and it
runs no torch operation before forking, so no OpenMP pool is forked); it reads one JSON line per
task on its standard input and exits when that closes, i.e. when the SuperExec is gone.

Usage (a SuperNode with ``--isolation process``, on the same machine)::

    flower-supernode --isolation process --host 127.0.0.1 --port 9094 ... &
    python -m flux_app.deploy.warm_exec --runtime-api-address 127.0.0.1:9094 --insecure

Every ``flower-superexec`` option works (``--root-certificates``, ``--parent-pid``, ...).
``--preload MOD,MOD`` replaces the list of modules the zygote imports (default:
:data:`DEFAULT_PRELOAD`); ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (Flower's) sets the task poll
interval in seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from flux_app.deploy.object_pulls import shorten_first_retry

logger = logging.getLogger(__name__)

#: what the zygote imports before it forks: the ClientApp's third-party cost (measured in
#: scripts/flwr_overhead.py: ~2 s of a fresh process), never the app's own code
DEFAULT_PRELOAD = (
    "numpy",
    "torch",
    "torch.nn",
    "torch.nn.functional",
    "torch.optim",
    "torch.utils.data",
    "httpx",  # the Runtime API client (httpcore and h11: ~0.7 s of a task on a busy machine)
    "httpcore",
    "h11",
    "flwr.clientapp",
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.supernode.runtime.run_clientapp",
)
#: the task fields the zygote needs (Flower's ExecutionSpec), sent as one JSON line
SPEC_FIELDS = (
    "runtime_api_address",
    "token",
    "insecure",
    "root_certificates_path",
    "parent_pid",
    "runtime_dependency_install",
    "suppress_output",
)
ZYGOTE_FLAG = "--zygote"


def clientapp_argv(spec: dict[str, Any]) -> list[str]:
    """The ``flwr-clientapp`` command line Flower's SubprocessExecutor builds for ``spec``."""
    argv = ["flwr-clientapp", "--runtime-api-address", str(spec["runtime_api_address"])]
    argv += ["--token", str(spec["token"])]
    if spec.get("insecure"):
        argv.append("--insecure")
    elif spec.get("root_certificates_path") is not None:
        argv += ["--root-certificates", str(spec["root_certificates_path"])]
    if spec.get("parent_pid") is not None:
        argv += ["--parent-pid", str(int(spec["parent_pid"]))]
    if spec.get("runtime_dependency_install"):
        argv.append("--allow-runtime-dependency-installation")
    return argv


# ----------------------------------------------------------------------------- the zygote


#: torch's thread count before the zygote's warm-up pinned it to 1 (restored in each task)
_TORCH_THREADS: int | None = None


def _warm_torch() -> float:
    """One forward/backward/SGD step of a tiny conv net, on one thread; returns its seconds.

    A fresh process pays ~0.9 s on its first training step (torch's lazy kernel set-up: measured
    0.93 s vs 0.02 s for the second step of a LeNet-5 batch); done once here, every forked task
    starts with it done. One thread, so that no OpenMP team exists when the zygote forks.
    """
    global _TORCH_THREADS
    import torch
    from torch import nn

    _TORCH_THREADS = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(36, 8),
        nn.Dropout(0.1),
        nn.Linear(8, 2),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.tensor([0, 1, 0, 1])
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        net.eval()(x).softmax(1).argmax(1)
    return time.perf_counter() - start


def _become_task(spec: dict[str, Any]) -> None:
    """In a freshly forked child: default signals, the task pipe is not its stdin, and torch
    has the thread count the node gave it."""
    if _TORCH_THREADS is not None:
        import torch

        torch.set_num_threads(_TORCH_THREADS)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if spec.get("suppress_output"):
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    os.close(devnull)


def _run_task(spec: dict[str, Any]) -> int:
    """In a task process: be ``flwr-clientapp`` for one task; returns its exit code."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = clientapp_argv(spec)
    try:
        flwr_clientapp()  # ends in flwr_exit -> SystemExit
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # noqa: BLE001 - a task must never return into the zygote's loop
        logger.exception("ClientApp task process failed")
        return 1
    return 0


def _reap() -> None:
    """Collect every finished task process (no zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _parse_spec(line: bytes) -> dict[str, Any] | None:
    """One task line from the SuperExec (our own parent, not a client): checked, or None."""
    try:
        spec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(spec, dict) or set(spec) - set(SPEC_FIELDS):
        return None
    if not isinstance(spec.get("runtime_api_address"), str) or not isinstance(
        spec.get("token"), str
    ):
        return None
    return spec


def zygote_main(preload: list[str], ack_fd: int) -> int:
    """Import ``preload`` (and warm torch up), then fork one task process per JSON line on
    stdin until EOF.

    On ``ack_fd`` it writes ``ready`` once the imports are done, then ``ok <pid>`` for every task
    process it forked or ``bad`` for a line it could not read.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the SuperExec decides when we go (EOF)
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError as err:  # a missing optional module only costs its import later
            print(f"[warm-exec] zygote: cannot preload {name}: {err}", file=sys.stderr)
    if "torch" in sys.modules:
        print(f"[warm-exec] zygote: torch warmed up in {_warm_torch():.2f} s", file=sys.stderr)
    # a forked task pulls its message's objects while its node may still be fetching them
    shorten_first_retry()
    os.write(ack_fd, b"ready\n")
    fd = sys.stdin.fileno()
    buffered = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        _reap()
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:  # the SuperExec is gone: running tasks finish on their own
            return 0
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            spec = _parse_spec(line)
            if spec is None:
                print("[warm-exec] zygote: ignored a malformed task line", file=sys.stderr)
                os.write(ack_fd, b"bad\n")
                continue
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(ack_fd)
                    _become_task(spec)
                    code = _run_task(spec)
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(code)
            os.write(ack_fd, f"ok {pid}\n".encode())


# ----------------------------------------------------------------------------- the executor


class WarmClientAppExecutor:
    """Flower's SuperExec executor interface; ClientApp tasks are forked from a warm zygote.

    A task is accepted once the zygote acknowledged its fork. A zygote that does not get ready,
    dies or does not acknowledge is replaced once; after that every ClientApp task starts cold,
    as Flower starts it, with a warning: a task is never lost to the warm path.

    Parameters
    ----------
    preload : list of str
        Modules the zygote imports once.
    ready_timeout, ack_timeout : float
        Seconds to wait for the zygote's imports, and for one fork's acknowledgement.
    """

    MODULE = "flux_app.deploy.warm_exec"

    def __init__(
        self, preload: list[str], ready_timeout: float = 300.0, ack_timeout: float = 30.0
    ) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.preload = list(preload)
        self.ready_timeout, self.ack_timeout = ready_timeout, ack_timeout
        self.fallback = SubprocessExecutor()
        self.zygote: subprocess.Popen | None = None
        self._acks: int | None = None
        self._pending = b""
        self.restarts_left = 1
        self._start_zygote()

    def _start_zygote(self) -> None:
        """Start a zygote and wait for its imports; on failure leave ``self.zygote`` None."""
        self._stop_zygote()
        read_end, write_end = os.pipe()
        cmd = [sys.executable, "-m", self.MODULE, ZYGOTE_FLAG, ",".join(self.preload)]
        self.zygote = subprocess.Popen(
            [*cmd, str(write_end)], stdin=subprocess.PIPE, pass_fds=(write_end,)
        )
        os.close(write_end)
        self._acks, self._pending = read_end, b""
        if self._read_ack(self.ready_timeout) != "ready":
            logger.warning("warm-exec: the zygote did not get ready; ClientApps start cold")
            self._stop_zygote()

    def _stop_zygote(self) -> None:
        if self.zygote is not None:
            with contextlib.suppress(OSError):
                if self.zygote.stdin is not None:
                    self.zygote.stdin.close()
            try:
                self.zygote.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.zygote.kill()
                self.zygote.wait()
        if self._acks is not None:
            os.close(self._acks)
        self.zygote, self._acks = None, None

    def _read_ack(self, timeout: float) -> str | None:
        """The zygote's next acknowledgement line, or None (timed out or gone)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if self._acks is None or left <= 0:
                return None
            ready, _, _ = select.select([self._acks], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._acks, 4096)
            if not chunk:
                return None
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode(errors="replace")

    def _fork(self, line: bytes) -> bool:
        """Hand one task to the zygote; True once it acknowledged the fork."""
        if self.zygote is None or self.zygote.stdin is None or self.zygote.poll() is not None:
            return False
        try:
            self.zygote.stdin.write(line)
            self.zygote.stdin.flush()
        except OSError:
            return False
        ack = self._read_ack(self.ack_timeout)
        return ack is not None and ack.startswith("ok ")

    # Flower's Executor protocol -------------------------------------------------------------
    def get_eligible_capacity(self, supported_task_types, **kwargs):  # noqa: ANN001, ANN201
        """Every task type can launch at once (as Flower's SubprocessExecutor)."""
        return self.fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type=None, **kwargs) -> None:  # noqa: ANN001
        """No capacity gate."""
        self.fallback.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec):  # noqa: ANN001, ANN201
        """Fork a ClientApp task from the zygote; other task types start as Flower starts them."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.fallback.launch(spec)
        line = (json.dumps({f: getattr(spec, f) for f in SPEC_FIELDS}) + "\n").encode()
        if self._fork(line):
            return LaunchResult.accepted()
        if self.zygote is not None or self.restarts_left > 0:
            logger.warning("warm-exec: the zygote failed a task; starting this one cold")
            if self.restarts_left > 0:
                self.restarts_left -= 1
                self._start_zygote()
            else:
                self._stop_zygote()
        return self.fallback.launch(spec)

    def reconcile(self) -> None:
        """Nothing to maintain between polls (the zygote reaps its own task processes)."""

    def close(self) -> None:
        """Close the zygote's task pipe: it exits; running tasks finish on their own."""
        self._stop_zygote()


def _take_preload(argv: list[str]) -> tuple[list[str], list[str]]:
    """Remove ``--preload MODS`` / ``--preload=MODS`` from ``argv``; return (preload, rest)."""
    preload, rest, i = list(DEFAULT_PRELOAD), [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--preload" and i + 1 < len(argv):
            preload, i = [m for m in argv[i + 1].split(",") if m], i + 2
            continue
        if arg.startswith("--preload="):
            preload = [m for m in arg.split("=", 1)[1].split(",") if m]
        else:
            rest.append(arg)
        i += 1
    return preload, rest


def main(argv: list[str] | None = None) -> None:
    """``flower-superexec`` with warm ClientApp processes (module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [ZYGOTE_FLAG] and len(argv) == 3:
        sys.exit(zygote_main([m for m in argv[1].split(",") if m], int(argv[2])))
    preload, rest = _take_preload(argv)

    import flwr.supercore.superexec.run_superexec as superexec_loop
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import ExecutorType

    if not hasattr(superexec_loop, "get_executor"):  # the one seam used; checked by the tests
        raise RuntimeError("this Flower version has no run_superexec.get_executor to replace")
    flower_get_executor = superexec_loop.get_executor

    def get_executor(executor_type, executor_config=None, **kwargs):  # noqa: ANN001, ANN202
        if executor_type != ExecutorType.SUBPROCESS:  # e.g. Kubernetes: Flower's own
            return flower_get_executor(executor_type, executor_config, **kwargs)
        return WarmClientAppExecutor(preload)

    superexec_loop.get_executor = get_executor
    sys.argv = ["flower-superexec", *rest]
    flower_superexec()


if __name__ == "__main__":
    main()
