"""flux_app.deploy.object_pulls: a short first retry for Flower's object pulls."""

from __future__ import annotations

import inspect
import time

import pytest

from flux_app.deploy import object_pulls


def test_flowers_backoff_is_the_one_we_shorten():
    """Flower's pull constants and keywords are the ones the module documents: an upgrade that
    changes them fails here."""
    from flwr.supercore import constant
    from flwr.supercore.inflatable import inflatable_utils

    assert (constant.PULL_INITIAL_BACKOFF, constant.PULL_BACKOFF_CAP) == object_pulls.FLOWER_BACKOFF
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        assert {"initial_backoff", "backoff_cap"} <= set(fn.__kwdefaults__)
    # the SuperNode stores the message (and creates its task) before it pulls the objects: the
    # race this module is for
    from flwr.supernode import start_client_internal

    src = inspect.getsource(start_client_internal._pull_and_store_message)
    assert src.index("state.store_message(message)") < src.index("pull_objects(")


def _unavailable_then(after: int):
    """A pull function whose object is unavailable for the first ``after`` calls."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    calls = {"n": 0}

    def pull(object_id: str) -> bytes:
        calls["n"] += 1
        if calls["n"] <= after:
            raise ObjectUnavailableError(object_id)
        return b"content"

    return pull, calls


@pytest.fixture
def restore_flower_defaults():
    from flwr.supercore.inflatable import inflatable_utils

    fns = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(fn.__kwdefaults__) for fn in fns]
    yield
    for fn, kw in zip(fns, saved, strict=True):
        fn.__kwdefaults__.clear()
        fn.__kwdefaults__.update(kw)


def test_an_object_that_arrives_late_is_pulled_without_a_one_second_wait(
    restore_flower_defaults, monkeypatch
):
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    pull, calls = _unavailable_then(1)
    start = time.monotonic()
    assert pull_objects(["a"], pull) == {"a": b"content"}
    flower = time.monotonic() - start
    assert flower >= 0.7  # Flower's first retry: 1 s +- 20 %

    monkeypatch.delenv(object_pulls.ENV, raising=False)
    assert object_pulls.shorten_first_retry() == object_pulls.FIRST_RETRY
    pull, calls = _unavailable_then(3)  # three early pulls: 0.02 + 0.04 + 0.08 s of pauses
    start = time.monotonic()
    assert pull_objects(["a"], pull) == {"a": b"content"}
    assert time.monotonic() - start < 0.5 and calls["n"] == 4
    # the cap and the number of tries stay Flower's
    assert pull_objects.__kwdefaults__["backoff_cap"] == object_pulls.FLOWER_BACKOFF[1]


def test_the_first_retry_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(object_pulls.ENV, "1")
    assert object_pulls.first_retry() == 1.0
    for bad in ("0", "-1", "nan", "soon", "11"):
        monkeypatch.setenv(object_pulls.ENV, bad)
        with pytest.raises(ValueError, match=object_pulls.ENV):
            object_pulls.first_retry()


def test_every_process_that_pulls_objects_shortens_its_first_retry():
    """The SuperNode wrapper, the warm ClientApp zygote (before it forks) and the ServerApp."""
    import server_app
    from flux_app.deploy import supernode, warm_exec

    for fn in (supernode.main, warm_exec.zygote_main, server_app.main):
        assert "shorten_first_retry()" in inspect.getsource(fn)
