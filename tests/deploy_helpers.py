"""Helpers shared by the tests of scripts/deploy_local.sh: find the Flower processes (and Fleet
proxies) a deployment left behind, the TCP sockets a set of processes listens on, and stop a
process's session."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

FLOWER_PROCESSES = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr",
    "fleet_proxy.py",  # scripts/fleet_proxy.py (deploy_local.sh --proxy)
    "flux_app.deploy.",  # deploy_local.sh: SuperNodes, warm SuperExecs and their zygotes
)


def flower_processes_mentioning(needles: list[str]) -> list[tuple[int, str]]:
    """Live Flower processes (and Fleet proxies) whose command line contains one of ``needles``."""
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


def kill_all(processes: list[tuple[int, str]]) -> None:
    """SIGKILL the given (pid, cmdline) pairs, ignoring those already gone."""
    for pid, _ in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    parent = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        parent[int(pid)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sorted(p for p in tree if p in parent)


def listening_sockets(pids: list[int]) -> list[tuple[str, int, int]]:
    """(local address, port, pid) of every TCP socket in LISTEN state held by ``pids``."""
    owner = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        owner[target[len("socket:[") : -1]] = pid
    found = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{table}") as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in owner:  # 0A = LISTEN
                    continue
                host_hex, port_hex = fields[1].split(":")
                found.append((_address(host_hex), int(port_hex, 16), owner[fields[9]]))
    return found


def _address(host_hex: str) -> str:
    """/proc/net/tcp{,6} writes addresses as little-endian 32-bit words in hex."""
    raw = bytes.fromhex(host_hex)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return ".".join(str(b) for b in words)
    if words[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped
        return ".".join(str(b) for b in words[12:])
    return ":".join(words[i : i + 2].hex() for i in range(0, 16, 2))


def stop_session(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the session ``proc`` leads (started with start_new_session=True), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    if proc.poll() is None:  # never signal a group whose leader is gone (its id may be reused)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
