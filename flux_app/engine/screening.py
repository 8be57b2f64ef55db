"""Checks of train replies against each other and the node's word: outliers in length among a
round's replies (models, or updates, far longer than their peers'), and sample counts.

Members of a screening group (a cluster; for FedDAG's warm-up, every node) start from the same
model with the same settings, so their trained models are nearly equally long: within 3 % in
every setting measured (docs/RELIABILITY.md, ``scripts/screen_ratios.py``), while a scaled
model (x10, x-10) is that many times as long. Their updates ``trained - sent`` differ more, with
the number of local steps (the train size) and how far each client still is from its optimum,
so the update bound is off by default. A reply beyond ``ratio`` times the lower median of the
others in its group is an outlier; a group of one is not screened (nothing to compare with);
the lower median keeps one liar of two apart.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import RecordDict

from flux_app.common.params import State, update_length
from flux_app.common.records import ReplyError, get_metric

if TYPE_CHECKING:  # pragma: no cover
    from flux_app.engine.strategy import ClusteredStrategy, Reply

logger = logging.getLogger("flwr")


def num_examples(content: RecordDict, announced: int | None) -> int:
    """A train reply's ``num-examples``: a positive integer, at most the train size the node's
    info announced (a node's weight in an average is bounded by it)."""
    n = get_metric(content, "metrics", "num-examples")
    if not float(n).is_integer() or n <= 0 or (announced is not None and n > announced):
        raise ReplyError(f"num-examples is {n!r} (announced train size {announced})")
    return int(n)


def screen_replies(
    strategy: ClusteredStrategy, replies: list[Reply], sent: Mapping[int, State]
) -> list[Reply]:
    """``replies`` without the outliers in length within their ``strategy.screen_group``
    (run-config ``max-model-norm-ratio``, ``max-update-norm-ratio``), each logged with the
    reason. ``sent``: the model a node was sent where it is not its cluster's."""
    cfg = strategy.cfg
    bounds = {"model": cfg.max_model_norm_ratio, "update": cfg.max_update_norm_ratio}
    if not any(bounds.values()) or len(replies) < 2:
        return replies
    groups: dict[Any, dict[int, tuple[State | None, State]]] = {}
    for r in replies:
        start = sent.get(r.node_id)
        if start is None and r.cluster is not None:
            start = strategy.models.get(r.cluster)
        if r.state is not None:
            groups.setdefault(strategy.screen_group(r), {})[r.node_id] = (start, r.state)
    rejected = length_outliers(groups, bounds)
    for node_id, reason in rejected.items():
        logger.warning("node %s: invalid train reply rejected: %s", node_id, reason)
    return [r for r in replies if r.node_id not in rejected]


def length_outliers(
    groups: Mapping[Any, Mapping[int, tuple[State | None, State]]],
    bounds: Mapping[str, float],
) -> dict[int, str]:
    """Node -> reason for every reply that is an outlier in length within its group.

    Parameters
    ----------
    groups : Mapping
        group -> node -> ``(sent model or None, trained model)``.
    bounds : Mapping[str, float]
        ``"model"`` / ``"update"`` -> largest allowed ratio to the lower median of the group's
        others (0 = no bound). ``"model"`` measures the trained model, ``"update"`` the
        difference to the sent one (nodes without a known sent model are skipped there).
    """
    rejected: dict[int, str] = {}
    for members in groups.values():
        for what, ratio in bounds.items():
            if not ratio:
                continue
            lengths = {
                n: update_length({} if what == "model" else sent, trained)
                for n, (sent, trained) in members.items()
                if what == "model" or sent is not None
            }
            for node_id, length in lengths.items():
                others = sorted(v for n, v in lengths.items() if n != node_id)
                if not others or node_id in rejected:
                    continue
                reference = others[(len(others) - 1) // 2]
                if length > ratio * reference:
                    rejected[node_id] = (
                        f"{what} length {length:.3g} > max-{what}-norm-ratio {ratio:g} x "
                        f"{reference:.3g} (the lower median of its cluster's others)"
                    )
    return rejected


__all__ = ["length_outliers", "num_examples", "screen_replies"]
