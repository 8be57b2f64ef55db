"""A short first retry when a Flower process pulls a message's objects before they are there.

In Flower 1.42 a message is visible before its objects are: a SuperNode stores a message and
creates its ClientApp task *before* it pulls the message's objects from the SuperLink
(``flwr/supernode/start_client_internal.py``, ``_pull_and_store_message``), and a node sends its
reply before it pushes the reply's objects. Whoever pulls early (a ClientApp forked warm, the
ServerApp collecting replies, a node pulling a message the ServerApp is still pushing) gets
``ObjectUnavailableError`` and retries after ``PULL_INITIAL_BACKOFF``, 1 s (+-20 %), doubling up
to 10 s (``flwr/supercore/inflatable/inflatable_utils.py``). On a deployment whose messages take
a second of work, that first second is a large part of every round.

:func:`shorten_first_retry` makes the first retry of both of Flower's pull functions wait
:data:`FIRST_RETRY` seconds in this process; the doubling, the 10 s cap, the number of tries
(500) and the time limit are Flower's, so a pull that really fails still fails after about as
long as before. ``FLUX_APP_PULL_FIRST_RETRY=<seconds>`` overrides it (``1``: Flower's pace).
Called by the SuperNode wrapper (:mod:`flux_app.deploy.supernode`), the warm ClientApp executor
(:mod:`flux_app.deploy.warm_exec`, before it forks tasks) and the ServerApp (``server_app.py``).
"""

from __future__ import annotations

import math
import os

#: Flower 1.42's first retry and cap of an object pull (seconds); checked against its source by
#: the tests, so that an upgrade that changes them is noticed
FLOWER_BACKOFF = (1, 10)
#: our first retry (seconds): a message's objects follow it within milliseconds on a healthy link
FIRST_RETRY = 0.02
ENV = "FLUX_APP_PULL_FIRST_RETRY"


def first_retry() -> float:
    """The first retry in seconds: ``FLUX_APP_PULL_FIRST_RETRY`` or :data:`FIRST_RETRY`."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return FIRST_RETRY
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.001 <= value <= FLOWER_BACKOFF[1]):
        raise ValueError(
            f"{ENV} must be seconds between 0.001 and {FLOWER_BACKOFF[1]}, got {text!r}"
        )
    return value


def shorten_first_retry(seconds: float | None = None) -> float:
    """Set the first retry of Flower's object pulls in this process; returns it.

    Raises ``RuntimeError`` when the installed Flower's pull functions no longer take an
    ``initial_backoff`` keyword (an upgrade changed them: this module needs a look).
    """
    from flwr.supercore.inflatable import inflatable_utils

    value = first_retry() if seconds is None else seconds
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__
        if not defaults or "initial_backoff" not in defaults:
            raise RuntimeError(
                f"flwr's {fn.__name__} has no initial_backoff keyword: "
                "flux_app.deploy.object_pulls does not fit this Flower version"
            )
        defaults["initial_backoff"] = value
    return value


__all__ = ["FIRST_RETRY", "FLOWER_BACKOFF", "first_retry", "shorten_first_retry"]
