"""Numbers a run reports: means that skip missing values, ARI / NMI against the ground-truth
groups, routing accuracy. Pure functions of the strategy's state."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from flux_app.engine.nodes import NodeInfo


def mean(values: Iterable[Any]) -> float | None:
    """Mean of the finite values (``None`` when there is none)."""
    vals = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def assignment_scores(
    nodes: Mapping[int, NodeInfo], assignment: Mapping[int, int], order: list[int]
) -> tuple[float | None, float | None]:
    """ARI and NMI of the nodes' clusters (``order``: the nodes to score) against their groups."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if len(order) < 2 or any(nodes[n].group < 0 for n in order):
        return None, None  # no ground truth (a real deployment without group.txt)
    truth = [nodes[n].group for n in order]
    pred = [assignment[n] for n in order]
    return float(adjusted_rand_score(truth, pred)), float(normalized_mutual_info_score(truth, pred))


def routing_accuracy(
    nodes: Mapping[int, NodeInfo], assignment: Mapping[int, int], routed: Mapping[int, int]
) -> float | None:
    """Share of routed nodes sent to the cluster holding most training nodes of their group
    (``None`` where some group is unknown)."""
    if any(nodes[n].group < 0 for n in [*assignment, *routed]):
        return None
    home: dict[int, Counter] = defaultdict(Counter)
    for n, c in assignment.items():
        home[nodes[n].group][c] += 1
    hits = [
        bool(home[nodes[n].group]) and home[nodes[n].group].most_common(1)[0][0] == c
        for n, c in routed.items()
    ]
    return float(np.mean(hits)) if hits else None


def clustering_record(
    nodes: Mapping[int, NodeInfo],
    assignment: Mapping[int, int],
    server_round: int,
    ari: float | None,
    nmi: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """results.json's ``clustering`` section: the assignment by partition id, ARI/NMI, extras."""
    by_pid = sorted(assignment.items(), key=lambda kv: nodes[kv[0]].sort_key)
    return {
        "round": server_round,
        "num_clusters": len(set(assignment.values())),
        "ari": ari,
        "nmi": nmi,
        "assignment": {nodes[n].name: c for n, c in by_pid},
        **extra,
    }


__all__ = ["assignment_scores", "clustering_record", "mean", "routing_accuracy"]
