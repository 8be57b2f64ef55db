"""Shared fixtures: Flower's task identity outside its runtime, offline environment."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # client_app / server_app live at the repository root
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
if "FLUX_APP_PARTITION_CACHE" not in os.environ:  # the suite's own cache, not the user's
    import atexit
    import shutil
    import tempfile

    os.environ["FLUX_APP_PARTITION_CACHE"] = tempfile.mkdtemp(prefix="flux-partitions-")
    atexit.register(shutil.rmtree, os.environ["FLUX_APP_PARTITION_CACHE"], True)


@pytest.fixture(autouse=True)
def _task_identity():
    """``Message(...)`` reads the sender from a slot Flower's runtime fills; fill it."""
    from flux_app.engine.inprocess import set_task_identity

    set_task_identity()
    yield


@pytest.fixture
def small_run(tmp_path):
    """Run-config overrides for a fast in-process run on the synthetic dataset."""
    return {
        "dataset": "synthetic",
        "shift": "px",
        "level": 2,
        "num-server-rounds": 2,
        "local-epochs": 1,
        "lr": 0.05,
        "output-dir": str(tmp_path / "out"),
        "run-name": "test",
        "device": "cpu",
    }


@pytest.fixture
def feddag_run(small_run):
    """A fast FedDAG run on the synthetic label-skew protocol (one warm-up round)."""
    return small_run | {
        "strategy": "feddag",
        "shift": "label-skew",
        "rho": 0.2,
        "alpha": 1.0,
        "num-server-rounds": 2,
        "feddag-warmup-rounds": 1,
        "feddag-warmup-epochs": 2,
    }
