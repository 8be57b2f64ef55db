"""Flower's SuperNode with a shorter pause between its pulls.

Flower 1.42's SuperNode (``flwr/supernode/start_client_internal.py``) sleeps 3 s after every
pull from the SuperLink that brought no message, and 0.5 s between its looks for a finished reply.
A message therefore waits 1.5 s on average (3 s at worst) before a node even sees it, and a
round has at least two (train, evaluate): on a loopback deployment that is most of a round whose
training takes a second (docs/BENCHMARKS.md, "Performance"). The pauses are constants in that
module, not options.

This runs Flower's own ``flower-supernode`` (same command line, same loop, same connection,
authentication and isolation) with every pause of that module capped at ``--poll-interval``
seconds (default :data:`DEFAULT_POLL_INTERVAL`). The cost is load on the SuperLink: an idle node
pulls ``1 / poll-interval`` times a second instead of a third of a time, so keep Flower's pace
(``--poll-interval 3``) for federations of thousands of nodes.

Usage: ``python -m flux_app.deploy.supernode --poll-interval 0.3 <flower-supernode options>``.
"""

from __future__ import annotations

import math
import sys
import time
from types import ModuleType

from flux_app.deploy.object_pulls import shorten_first_retry

DEFAULT_POLL_INTERVAL = 0.3
#: the pauses of Flower 1.42's SuperNode loop (idle pull, reply wait, object wait); checked
#: against its source by the tests, so that a Flower upgrade that changes them is noticed
FLOWER_PAUSES = (3, 0.5, 0.5)


class CappedClock:
    """The ``time`` module as one Flower module sees it, with every ``sleep`` capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        """Sleep ``min(seconds, cap)``."""
        time.sleep(min(seconds, self.cap))


def cap_pauses(module: ModuleType, cap: float) -> None:
    """Make ``module``'s ``time.sleep`` calls pause at most ``cap`` seconds."""
    if getattr(module, "time", None) is not time:
        raise RuntimeError(f"{module.__name__} does not use the time module as expected")
    module.time = CappedClock(cap)


def _take_poll_interval(argv: list[str]) -> tuple[float, list[str]]:
    """Remove ``--poll-interval S`` / ``--poll-interval=S`` from ``argv``."""
    value, rest, i = str(DEFAULT_POLL_INTERVAL), [], 0
    while i < len(argv):
        if argv[i] == "--poll-interval" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--poll-interval="):
            value = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    try:
        interval = float(value)
    except ValueError:
        interval = math.nan
    if not (math.isfinite(interval) and 0.01 <= interval <= 60):
        raise SystemExit(f"--poll-interval must be between 0.01 and 60 seconds, got {value!r}")
    return interval, rest


def main(argv: list[str] | None = None) -> None:
    """``flower-supernode`` with its pauses capped (module docstring)."""
    interval, rest = _take_poll_interval(sys.argv[1:] if argv is None else argv)
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    cap_pauses(start_client_internal, interval)
    shorten_first_retry()  # the node's pulls of a message's objects (object_pulls.py)
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
