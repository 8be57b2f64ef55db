"""End to end through ``flwr run``: a real simulation on Flower's Ray engine.

Both tests share one local SuperLink (module-scoped private FLWR_HOME). ``flwr run`` starts the
local SuperLink on fixed ports (39091 HTTP, 39093 Control) and reuses any SuperLink found there,
which would send our runs to somebody else's SuperLink; Flower 1.42 reads the ports from
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT``, so the fixture gives
this module free ports of its own and stops the SuperLink it started at the end.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_simulate():
    spec = importlib.util.spec_from_file_location(
        "flux_simulate_script", os.path.join(ROOT, "scripts", "simulate.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sim = _load_simulate()


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _processes_mentioning(*needles: str) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose command line contains any needle."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd and any(n in cmd for n in needles):
            found.append((int(pid), cmd))
    return found


@pytest.fixture(scope="module")
def flwr_home(tmp_path_factory):
    """A private FLWR_HOME and private local-SuperLink ports; the SuperLink is stopped after."""
    home = str(tmp_path_factory.mktemp("flwr-home"))
    http_port, control_port = _free_ports(2)
    if _port_in_use(http_port) or _port_in_use(control_port):  # lost a race for the ports
        pytest.skip(f"ports {http_port}/{control_port} were taken by another process")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(http_port))
    mp.setenv("FLWR_LOCAL_CONTROL_API_PORT", str(control_port))
    try:
        yield home
    finally:
        sim.stop_local_superlink(home)
        # The SuperExec's command line names the port, not the home; it follows its parent.
        needles = (home, f"127.0.0.1:{http_port}")
        deadline = time.time() + 30
        while _processes_mentioning(*needles) and time.time() < deadline:
            time.sleep(0.5)
        left = _processes_mentioning(*needles)
        mp.undo()
        assert not left, f"processes of the test SuperLink still running: {left}"


CONFIG: dict[str, object] = {
    "strategy": "flux",
    "dataset": "synthetic",
    "shift": "px",
    "level": 2,
    "num-server-rounds": 2,
    "flux-cluster-round": 1,
    "local-epochs": 1,
    "lr": 0.05,
    "holdout-clients": 1,
    "seed": 3,
    "device": "cpu",
}
NODES = 5


def _overrides(tmp_path, **extra: object) -> list[str]:
    values = dict(CONFIG) | {"output-dir": str(tmp_path / "out"), "run-name": "e2e"}
    values.update(extra)
    return [" ".join(f"{k}={json.dumps(v)}" for k, v in values.items())]


def test_flux_simulation_completes_and_matches_inprocess(flwr_home, tmp_path):
    """A FLUX run through Ray completes, and the in-process grid (used by the benchmark harness)
    reproduces it: same clustering, same bytes, same accuracies up to float noise."""
    import torch

    from flux_app.engine.inprocess import run_inprocess

    run_id, status, results = sim.simulate(
        _overrides(tmp_path), nodes=NODES, flwr_home=flwr_home, timeout=600, quiet=True
    )
    assert run_id, "flwr run did not report a run id"
    assert status == "finished:completed", f"run {run_id} ended as {status!r}"
    # the status comes from `flwr ls` through this module's SuperLink: ask it again directly
    assert sim.run_status(run_id, sim.flower_env(flwr_home)) == "finished:completed"

    run_dir = tmp_path / "out" / "e2e"
    assert results == str(run_dir / "results.json")
    data = json.loads((run_dir / "results.json").read_text())
    assert [row["round"] for row in data["rounds"]] == [1, 2]
    final = data["final"]
    known = final["accuracy_known"]
    assert isinstance(known, (int, float)) and not isinstance(known, bool)
    assert math.isfinite(known) and 0.0 <= known <= 1.0
    assert final["accuracy_holdout"] is not None

    state = torch.load(run_dir / "checkpoints" / "cluster_0.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())

    same, _ = run_inprocess(
        CONFIG | {"output-dir": str(tmp_path / "inproc"), "run-name": "e2e"}, NODES
    )
    assert data["clustering"]["assignment"] == same["clustering"]["assignment"]
    for a, b in zip(data["rounds"], same["rounds"], strict=True):
        assert a["num_clusters"] == b["num_clusters"]
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.02)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02)
    assert final["holdout_assignment"] == same["final"]["holdout_assignment"]
    assert known == pytest.approx(same["final"]["accuracy_known"], abs=0.02)


def test_bad_run_config_ends_as_failed(flwr_home, tmp_path):
    """level=9 is rejected by the ServerApp: the run must not count as completed."""
    run_id, status, results = sim.simulate(
        _overrides(tmp_path, level=9, **{"run-name": "e2e-bad"}),
        nodes=3,
        flwr_home=flwr_home,
        timeout=300,
        quiet=True,
    )
    assert run_id, "flwr run did not report a run id"
    assert status != "finished:completed"
    assert status.startswith("finished"), f"run {run_id} did not end: {status!r}"
    assert results == ""
    assert not (tmp_path / "out" / "e2e-bad" / "results.json").exists()


def test_plugin_method_runs_through_flwr_run(flwr_home, tmp_path):
    """A method outside the package (examples/hist_kmeans.py): its strategy, its own setting
    (through plugin-config) and its own client action, served by the Ray actors' ClientApps."""
    extra = {
        "plugins": "examples.hist_kmeans",
        "strategy": "hist-kmeans",
        "plugin-config": "hist-kmeans-k-max=3",
        "shift": "label-skew",
        "rho": 0.5,
        "alpha": 100.0,
        "run-name": "e2e-plugin",
    }
    run_id, status, results = sim.simulate(
        _overrides(tmp_path, **extra), nodes=6, flwr_home=flwr_home, timeout=600, quiet=True
    )
    assert status == "finished:completed", f"run {run_id} ended as {status!r}"
    data = json.loads((tmp_path / "out" / "e2e-plugin" / "results.json").read_text())
    assert data["clustering"]["k_max"] == 3  # the plug-in's own key reached its section
    assert data["final"]["num_clusters"] == 2 and data["final"]["ari"] == pytest.approx(1.0)
    assert data["final"]["routing_accuracy"] == 1.0  # query.label_histogram on a held-out node
    run_config = json.loads((tmp_path / "out" / "e2e-plugin" / "run_config.json").read_text())
    assert run_config["hist-kmeans-k-max"] == 3
