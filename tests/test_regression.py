"""Same seeds, same numbers: every strategy's results on the pinned synthetic setting equal the
ones recorded before the per-method layout (tests/data/regression.json, scripts/regression.py;
the digits setting is checked by ``python scripts/regression.py --check``)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location(
        "flux_regression", os.path.join(ROOT, "scripts", "regression.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reg = _script()
with open(reg.PINNED) as fh:
    PINNED = json.load(fh)
SETTING = "synthetic-label-skew"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the pins were recorded with one thread
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("strategy", reg.STRATEGIES)
def test_results_equal_the_pinned_ones(strategy):
    got = json.loads(json.dumps(reg.run_one(SETTING, strategy)))
    want = PINNED[SETTING][strategy]
    assert got["assignment"] == want["assignment"]
    # floats to 1e-6 relative: other CPUs' float32 kernels round sums differently (~1e-8)
    assert reg.same(got["final"], want["final"]), (got["final"], want["final"])
    assert reg.same(got["rounds"], want["rounds"]), (got["rounds"], want["rounds"])


def test_the_comparison_tolerates_rounding_and_nothing_else():
    assert reg.same({"a": [2.3014768064022064]}, {"a": [2.3014768]})
    assert not reg.same({"a": [2.3014768]}, {"a": [2.3015]})  # a changed computation
    assert not reg.same({"a": 1}, {"a": 1, "b": 2}) and not reg.same([0.2], [0.2, 0.2])
    assert not reg.same({"acc": 0.2}, {"acc": "0.2"})


def test_pins_cover_every_builtin_strategy_and_both_settings():
    from flux_app.engine.registry import STRATEGIES, load_plugins

    load_plugins()
    builtin = {n for n, c in STRATEGIES.items() if c.__module__.startswith("flux_app.")}
    assert builtin == set(reg.STRATEGIES)
    for setting in reg.SETTINGS:
        assert set(PINNED[setting]) == set(reg.STRATEGIES), setting
