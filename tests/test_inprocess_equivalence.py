"""The in-process grid gives the same run as `flwr run` on Flower's Ray engine (same seed).

This is what allows the benchmark harness to use the in-process grid: same ServerApp logic, same
ClientApp handlers, same seeds; only the transport differs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket

import pytest

from flux_app.inprocess import run_inprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {
    "strategy": "flux",
    "dataset": "synthetic",
    "shift": "px",
    "level": 2,
    "num-server-rounds": 2,
    "cluster-round": 1,
    "local-epochs": 1,
    "lr": 0.05,
    "holdout-clients": 1,
    "seed": 3,
    "device": "cpu",
}
NODES = 5


def _simulate_module():
    spec = importlib.util.spec_from_file_location(
        "simulate", os.path.join(ROOT, "scripts", "simulate.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _toml(value) -> str:
    return f'"{value}"' if isinstance(value, str) else json.dumps(value)


@pytest.mark.slow
def test_inprocess_matches_flwr_run(tmp_path):
    if not (_port_free(39091) and _port_free(39093)):
        pytest.skip("another SuperLink holds 127.0.0.1:39091/39093")
    sim = _simulate_module()
    home = str(tmp_path / "flwr-home")
    overrides = " ".join(f"{k}={_toml(v)}" for k, v in CONFIG.items())
    overrides += f' output-dir="{tmp_path / "flwr"}" run-name="eq"'
    try:
        _, status, _ = sim.simulate(
            [overrides], nodes=NODES, flwr_home=home, timeout=600, quiet=True
        )
    finally:
        sim.stop_local_superlink(home)
    assert status == "finished:completed"
    with open(tmp_path / "flwr" / "eq" / "results.json") as fh:
        via_flwr = json.load(fh)

    via_inprocess, _ = run_inprocess(
        CONFIG | {"output-dir": str(tmp_path / "inproc"), "run-name": "eq"}, NODES
    )

    assert via_flwr["clustering"]["assignment"] == via_inprocess["clustering"]["assignment"]
    for a, b in zip(via_flwr["rounds"], via_inprocess["rounds"], strict=True):
        assert a["num_clusters"] == b["num_clusters"]
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.02)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02)
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
    fa, fb = via_flwr["final"], via_inprocess["final"]
    assert fa["holdout_assignment"] == fb["holdout_assignment"]
    assert fa["accuracy_known"] == pytest.approx(fb["accuracy_known"], abs=0.02)
