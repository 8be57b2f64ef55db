"""flux_app.deploy.supernode: Flower's SuperNode with its pauses capped."""

from __future__ import annotations

import ast
import inspect
import time
import types

import pytest

from flux_app.deploy import supernode


def test_flowers_pauses_are_the_ones_we_cap():
    """The SuperNode loop's sleeps are the constants the module documents: a Flower upgrade that
    changes them (or stops sleeping through the time module) fails here."""
    from flwr.supernode import start_client_internal

    tree = ast.parse(inspect.getsource(start_client_internal))
    pauses = [
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) == "time.sleep"
        and isinstance(node.args[0], ast.Constant)
    ]
    assert sorted(pauses) == sorted(supernode.FLOWER_PAUSES)
    assert start_client_internal.time is time


def test_capped_clock_caps_every_sleep_and_forwards_the_rest():
    fake = types.ModuleType("fake_flower_loop")
    fake.time = time
    supernode.cap_pauses(fake, 0.05)
    start = time.monotonic()
    fake.time.sleep(3)
    fake.time.sleep(0.5)
    assert time.monotonic() - start < 1.0
    start = time.monotonic()
    fake.time.sleep(0.01)  # below the cap: as asked
    assert time.monotonic() - start >= 0.009
    assert fake.time.monotonic() >= start and fake.time.time() > 1e9


def test_a_module_that_does_not_sleep_through_time_is_refused():
    fake = types.ModuleType("fake_flower_loop")
    fake.time = object()
    with pytest.raises(RuntimeError, match="does not use the time module"):
        supernode.cap_pauses(fake, 0.1)


def test_poll_interval_option():
    assert supernode._take_poll_interval(
        ["--insecure", "--poll-interval", "0.5", "--port", "1"]
    ) == (
        0.5,
        ["--insecure", "--port", "1"],
    )
    assert supernode._take_poll_interval(["--poll-interval=2"]) == (2.0, [])
    assert supernode._take_poll_interval([])[0] == supernode.DEFAULT_POLL_INTERVAL
    for bad in ("0", "-1", "nan", "inf", "abc", "61"):
        with pytest.raises(SystemExit, match="--poll-interval"):
            supernode._take_poll_interval(["--poll-interval", bad])
