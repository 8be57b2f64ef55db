"""IFCA (Ghosh et al., NeurIPS 2020): K models, each client picks the one with the lowest loss.

Paper mechanics
    The server keeps K cluster models (K given). Every round each participating client receives
    all K, evaluates the loss of each on its local training data, estimates its cluster as the
    argmin, trains that model locally and uploads it; the server averages, per model, the uploads
    of the clients that chose it. A model nobody chose keeps its weights. The cost per client and
    round is K model downloads and K local evaluations (plus one upload).

Our decisions
    * Initial models: K distinct seeded inits. Model 0 is the run's common init (so ``K = 1`` is
      exactly FedAvg), model ``j > 0`` uses the seed ``derive_seed(seed, "peer-init", j)``.
    * Transport: the ClientApp is stateless between messages, so the selection is a
      ``query.scores`` (the K models, ``split = "train"``; losses come back as metrics) followed by
      the ``train`` message carrying the chosen model. That is K + 1 model downloads per client and
      round, one more than the paper's single broadcast; results.json counts what really travels:
      ``bytes_model_down`` = train + selection downloads (it overrides the base's train-only
      figure), with ``bytes_selection_down`` beside it. Losses are metrics (a few bytes), so the
      selection adds nothing to ``bytes_up``.
    * Ties in the loss: the lowest model index. A node whose scores reply is missing or malformed
      (wrong length, non-finite) does not train this round (logged) and keeps its last choice.
    * Assignment = each node's latest choice; it is what evaluation uses and what
      ``record_clustering`` stores (every round the choice changes). Before its first choice a
      node holds a placeholder (round-robin); with ``fraction-train = 1`` every node chooses in
      round 1 before anything is evaluated.
    * Paper options not used: weight sharing between cluster models, and multiple restarts.

Routing (held-out nodes at the end, late nodes when they join)
    The same rule as training: the model with the lowest loss on the node's own labelled TRAIN
    split (``query.scores``). Unlike FLUX/FedDAG routing this needs labels on the routed node.

:func:`route_by_loss` and :func:`peer_model` are shared by CFL and FeSEM.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from flux_app.client import derive_seed
from flux_app.models import build_model
from flux_app.records import ReplyError, get_metric, to_record
from flux_app.strategies.base import ClusteredStrategy, State, is_dual

logger = logging.getLogger("flwr")

SCORES = "query.scores"


def peer_model(strategy: ClusteredStrategy, index: int) -> State:
    """Seeded initial model ``index``: 0 is the common init, others are distinct seeded inits.

    Parameters
    ----------
    strategy : ClusteredStrategy
        A strategy whose nodes are known (the input shape comes from their info).
    index : int
        Model index; ``0`` reproduces :meth:`ClusteredStrategy.initial_model`.
    """
    if index == 0:
        return strategy.initial_model()
    info = next(iter(strategy.nodes.values()))
    model = build_model(
        strategy.cfg.model_name,
        info.input_shape,
        info.num_classes,
        dual=strategy.dual_model,
        seed=derive_seed(strategy.cfg.seed, "peer-init", index),
    )
    return OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())


def current_round(strategy: ClusteredStrategy) -> int:
    """The round in progress (``num-server-rounds + 1`` once the loop is over): the tag of
    messages sent from ``route``, which the base calls without a round."""
    return len(strategy.results["rounds"]) + 1


def scores_content(states: list[State], server_round: int, split: str = "train") -> RecordDict:
    """A ``query.scores`` payload: ArrayRecords ``model-0..model-{K-1}`` + ConfigRecord."""
    content = RecordDict({f"model-{i}": to_record(s) for i, s in enumerate(states)})
    conf = {"server-round": server_round, "split": split, "dual": is_dual(states[0])}
    content["config"] = ConfigRecord(conf)
    return content


def read_losses(content: RecordDict, k: int) -> np.ndarray:
    """The ``k`` losses of a ``query.scores`` reply, or :class:`ReplyError`."""
    losses = get_metric(content, "metrics", "losses")
    if not isinstance(losses, list) or len(losses) != k:
        raise ReplyError(f"expected {k} losses, got {losses!r}")
    arr = np.asarray(losses, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ReplyError("non-finite loss")
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
    states = [candidates[c] for c in ids]
    # One payload object for all nodes: the records are serialised once, counted per message.
    payload = scores_content(states, server_round, split)
    replies = strategy.send(SCORES, {n: payload for n in node_ids}, server_round)
    out: dict[int, int] = {}
    for n in node_ids:
        if n not in replies:
            continue
        try:
            losses = read_losses(replies[n], len(ids))
        except ReplyError as err:
            logger.warning("node %s: scores reply rejected: %s", n, err)
            continue
        out[n] = ids[int(np.argmin(losses))]  # argmin returns the first minimum: lowest id
    return out


class Ifca(ClusteredStrategy):
    """IFCA on the strategy base: hooks ``setup``, ``select_nodes`` (the loss-based choice),
    ``route`` and ``final_metrics`` (see the module docstring)."""

    name = "ifca"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.selection_bytes_down = 0

    def setup(self) -> None:
        """K distinct seeded models; a round-robin placeholder until each node's first choice."""
        k = self.cfg.num_clusters
        self.models = {j: peer_model(self, j) for j in range(k)}
        self.assignment = {n: i % k for i, n in enumerate(self.training_nodes())}

    def select_nodes(self, server_round: int) -> list[int]:
        """The sampled nodes pick their model (argmin train loss); those that replied train."""
        sampled = super().select_nodes(server_round)
        before = self.traffic[SCORES]["down"]
        choice = route_by_loss(self, sampled, self.models, server_round)
        self.selection_bytes_down += self.traffic[SCORES]["down"] - before
        dropped = [n for n in sampled if n not in choice]
        if dropped:
            logger.warning(
                "ifca round %d: no valid scores from %s; they skip", server_round, dropped
            )
        changed = any(self.assignment.get(n) != c for n, c in choice.items())
        self.assignment.update(choice)
        if changed or self.clustering is None:
            self.record_clustering(server_round)
        return [n for n in sampled if n in choice]

    def route(self, node_ids: list[int]) -> dict[int, int | None]:
        """Lowest loss on the node's own train split (needs its labels)."""
        placed = route_by_loss(self, node_ids, self.models, current_round(self))
        return {n: placed.get(n) for n in node_ids}

    def final_metrics(self) -> dict[str, Any]:
        """Model downloads include the K-model selection broadcast of every round."""
        return {
            "bytes_selection_down": self.selection_bytes_down,
            "bytes_model_down": self.traffic["train"]["down"] + self.selection_bytes_down,
        }


__all__ = ["Ifca", "current_round", "peer_model", "read_losses", "route_by_loss", "scores_content"]
