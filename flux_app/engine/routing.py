"""Placing nodes by loss: the candidate model with the lowest loss on a node's own data.

IFCA picks its cluster this way every round; CFL and FeSEM place held-out and late nodes this
way. The node evaluates every candidate in one ``query.scores`` message (served by the engine's
generic client, :func:`flux_app.engine.client.handle_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from flux_app.common.params import State
from flux_app.common.records import ReplyError, get_metric, to_record

if TYPE_CHECKING:  # pragma: no cover
    from flux_app.engine.strategy import ClusteredStrategy

SCORES = "query.scores"


def scores_content(states: list[State], server_round: int, split: str = "train") -> RecordDict:
    """A ``query.scores`` payload: ArrayRecords ``model-0..model-{K-1}`` + ConfigRecord."""
    content = RecordDict({f"model-{i}": to_record(s) for i, s in enumerate(states)})
    content["config"] = ConfigRecord({"server-round": server_round, "split": split})
    return content


def read_losses(content: RecordDict, k: int) -> np.ndarray:
    """The ``k`` losses of a ``query.scores`` reply, or :class:`ReplyError` (not a list of
    ``k`` numbers, non-finite, or negative: a cross-entropy loss is ``>= 0``)."""
    losses = get_metric(content, "metrics", "losses")
    if not isinstance(losses, list) or len(losses) != k:
        raise ReplyError(f"expected {k} losses, got {str(losses)[:80]}")
    arr = np.asarray(losses, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ReplyError("non-finite loss")
    if np.any(arr < 0):
        raise ReplyError(f"negative loss {float(arr.min())!r}")
    return arr


def route_by_loss(
    strategy: ClusteredStrategy,
    node_ids: list[int],
    candidates: Mapping[int, State],
    server_round: int,
    split: str = "train",
) -> dict[int, int]:
    """Cluster of each node = the candidate model with the lowest loss on the node's data.

    Parameters
    ----------
    strategy : ClusteredStrategy
        Sends the ``query.scores`` messages (bytes are counted under that type).
    node_ids : list[int]
        Nodes to place.
    candidates : Mapping[int, State]
        Cluster id -> model.
    server_round : int
        Round tag of the messages.
    split : str
        The node's split to score on (``train``: labelled local data).

    Returns
    -------
    dict[int, int]
        Node -> cluster id for every node that sent a valid reply (ties: lowest cluster id).
        With a single candidate no message is sent.
    """
    ids = sorted(candidates)
    if not node_ids or not ids:
        return {}
    if len(ids) == 1:
        return {n: ids[0] for n in node_ids}
    # One payload object for all nodes: the records are serialised once, counted per message.
    payload = scores_content([candidates[c] for c in ids], server_round, split)
    losses = strategy.collect(
        SCORES,
        {n: payload for n in node_ids},
        server_round,
        lambda _, content: read_losses(content, len(ids)),
        what="scores reply",
        exclude=False,
    )
    # argmin returns the first minimum: the lowest id
    return {n: ids[int(np.argmin(v))] for n, v in losses.items()}


__all__ = ["SCORES", "read_losses", "route_by_loss", "scores_content"]
