"""Drift: clients whose data changes during training (issue #14's drift protocol).

From round ``drift-round`` on, a seeded ``drift-fraction`` of the training clients draw their
data from another group's distribution: the same samples of their own share, under the shift
(rotation / colour, class subset, label permutation, class-wise rotation, concept map) of a
group that other training clients hold, so an existing cluster model fits them after the switch.
Held-out clients never drift. Nothing tells a method that (or when) it happened: a node's
``query.info`` still reports its data, which is how the drift-aware Oracle learns the new group.
"""

from __future__ import annotations

import numpy as np

from flux_app.data.shifts import ShiftSpec, partition_groups
from flux_app.data.sources import Source


def drift_regroup(
    source: Source,
    spec: ShiftSpec,
    num_partitions: int,
    holdout: int,
    fraction: float,
) -> tuple[tuple[int, int], ...]:
    """The drifting clients and the group each switches to.

    Parameters
    ----------
    source, spec, num_partitions
        The federation (as :func:`~flux_app.data.shifts.partition_plan`).
    holdout : int
        Held-out clients (the last partitions): they never train, so they never drift.
    fraction : float
        Share of the training clients that drift, in ``(0, 1]`` (at least one client).

    Returns
    -------
    tuple of (partition id, new group)
        Sorted by partition id; empty when fewer than two groups train (nowhere to drift to).
        Seeded by the run's seed only: every node and the server agree on it.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"drift fraction must be in (0, 1], got {fraction!r}")
    groups = partition_groups(source, spec, num_partitions)[: num_partitions - holdout]
    present = sorted(set(groups.tolist()))
    if len(present) < 2:
        return ()
    rng = np.random.default_rng([spec.seed, 0xD21F7])
    count = max(1, int(round(fraction * len(groups))))
    movers = np.sort(rng.choice(len(groups), size=min(count, len(groups)), replace=False))
    out = []
    for pid in movers.tolist():
        others = [g for g in present if g != groups[pid]]
        out.append((int(pid), int(others[int(rng.integers(len(others)))])))
    return tuple(out)


__all__ = ["drift_regroup"]
