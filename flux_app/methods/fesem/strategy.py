"""FeSEM (Xie et al., "Multi-center federated learning", 2020): k-means of client models.

Paper mechanics
    The server keeps K centres (K given). Each round the participating clients train locally,
    starting from their assigned centre; the E-step assigns each client's trained model to the
    nearest centre by the L2 distance of the flattened parameters; the M-step sets every centre to
    the (sample-weighted) mean of the models assigned to it. A centre with no client keeps its
    model. It is stochastic EM on ``sum_i min_k ||W_i - C_k||^2``.

Our decisions
    * Initial centres (the paper draws them at random): K independent seeded inits cannot work
      with "train from your centre, then pick the nearest": LeNet-5 inits have norm ~8.9 and two
      seeded inits are ~12.5 apart in L2, while one round of local training moves a model by
      0.25-2.8 (digits, lr 0.05, 5 epochs), so every client stays with the centre it started
      from and the clustering is the initial draw. We therefore initialise like k-means: in round
      1 every participant trains from the common init (FeSEM's local models), and the K centres
      are drawn among those trained models by seeded k-means++ (distance to the nearest chosen
      centre, squared, as the sampling weight). The E- and M-steps of that same round follow.
      This keeps the centres distinct and makes the clustering data-driven. With fewer distinct
      round-1 models than K, K shrinks to that number.
    * Distances use every floating entry of the state dict, flattened (float64). Ties: lowest
      centre id.
    * Nodes that did not take part in round 1 (``fraction-train < 1``) hold centre 0 until they
      train.
    * The assignment is recorded (``record_clustering``) whenever it changes.

Routing (held-out nodes at the end, late nodes when they join)
    The centre whose model has the lowest loss on the node's own labelled TRAIN split
    (``query.scores``). (The paper's E-step would need the node to train first; loss-based
    placement needs one evaluation per centre and no training.)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flux_app.common.params import State, flat_params
from flux_app.common.seeding import derive_seed
from flux_app.engine.registry import register_strategy
from flux_app.engine.routing import route_by_loss
from flux_app.engine.strategy import ClusteredStrategy, Reply

logger = logging.getLogger("flwr")


def nearest_centres(states: Sequence[State], centres: Mapping[int, State]) -> list[int]:
    """E-step: for each model, the id of the nearest centre in L2 parameter distance.

    Parameters
    ----------
    states : Sequence[State]
        Trained client models.
    centres : Mapping[int, State]
        Centre id -> model (same keys and shapes).

    Returns
    -------
    list[int]
        One centre id per model (ties: the lowest id).
    """
    ids = sorted(centres)
    c = np.stack([flat_params(centres[k]) for k in ids])
    out = []
    for s in states:
        d = np.linalg.norm(c - flat_params(s)[None, :], axis=1)
        out.append(ids[int(np.argmin(d))])
    return out


def kmeanspp(points: np.ndarray, k: int, seed: int) -> list[int]:
    """Seeded k-means++ seeding: indices of up to ``k`` distinct rows of ``points``.

    Stops early when every remaining row coincides with a chosen one.
    """
    n = points.shape[0]
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(n))]
    d2 = np.sum((points - points[chosen[0]]) ** 2, axis=1)
    while len(chosen) < min(k, n):
        if d2.sum() <= 0:
            break
        nxt = int(rng.choice(n, p=d2 / d2.sum()))
        chosen.append(nxt)
        d2 = np.minimum(d2, np.sum((points - points[nxt]) ** 2, axis=1))
    return chosen


@register_strategy("fesem")
class Fesem(ClusteredStrategy):
    """FeSEM on the strategy base: hooks ``setup``, ``aggregate`` (E- and M-step) and ``route``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.centres_ready = False

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {**super().state_dict(), "centres_ready": self.centres_ready}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        self.centres_ready = bool(state["centres_ready"])

    def init_centres(self, server_round: int, replies: list[Reply]) -> None:
        """k-means++ among the round's trained models (see the module docstring)."""
        points = np.stack([flat_params(r.state) for r in replies])
        picked = kmeanspp(points, self.cfg.num_clusters, derive_seed(self.cfg.seed, "fesem"))
        self.models = {k: replies[i].state for k, i in enumerate(picked)}
        self.centres_ready = True
        logger.info(
            "fesem round %d: %d centre(s) seeded from the models of partitions %s",
            server_round,
            len(self.models),
            [self.nodes[replies[i].node_id].partition_id for i in picked],
        )

    def aggregate(self, server_round: int, replies: list[Reply]) -> None:
        """E-step (nearest centre) then M-step (sample-weighted mean per centre)."""
        if not self.centres_ready:
            self.init_centres(server_round, replies)
        assigned = nearest_centres([r.state for r in replies], self.models)
        changed = False
        members: dict[int, list[Reply]] = defaultdict(list)
        for r, k in zip(replies, assigned, strict=True):
            changed |= self.assignment.get(r.node_id) != k
            self.assignment[r.node_id] = k
            members[k].append(r)
        for k, rs in members.items():  # centres without members keep their model
            states = [r.state for r in rs]
            self.models[k] = self.combine(k, states, [r.num_examples for r in rs], server_round)
        if changed or self.clustering is None:
            self.record_clustering(server_round)

    def route(self, node_ids: list[int], server_round: int) -> dict[int, int | None]:
        """Lowest loss on the node's own train split (needs its labels)."""
        placed = route_by_loss(self, node_ids, self.models, server_round)
        return {n: placed.get(n) for n in node_ids}


__all__ = ["Fesem", "kmeanspp", "nearest_centres"]
