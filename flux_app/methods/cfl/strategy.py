"""CFL (Sattler et al., IEEE TNNLS 2020): split a cluster when its clients' updates disagree.

Paper mechanics
    Training starts with one cluster (FedAvg). After each round, for every cluster the server
    looks at its clients' updates ``dW_i = W_i(trained) - W(sent)``: when the weighted mean update
    is small (``||sum_i w_i dW_i|| < eps1``: the cluster is near a stationary point of its joint
    objective) yet some client still moves a lot (``max_i ||dW_i|| > eps2``), the clients'
    objectives disagree and the cluster is bipartitioned by the cosine similarity of their updates
    (complete linkage, two groups). Both halves start from the current cluster model. Splits are
    recursive: each new cluster is checked again in later rounds.

Our decisions
    * Updates are all floating entries of the state dict, flattened in state order, taken against
      the model the cluster sent this round; weights are the clients' sample counts (the
      paper's ``|D_i| / |D_c|``). The check runs after the round's FedAvg.
    * Only clusters with more than two participating clients this round are checked (the
      paper's ``|c| > 2``), and only from round ``cfl-min-round`` on (the paper waits 20 rounds).
    * At a split each half's model is the FedAvg of its own members' trained models (the
      paper aggregates per cluster after the clustering step), so the halves differ at once.
    * A member of a split cluster that did not take part in the splitting round (with
      ``fraction-train < 1`` most of them) picks the half whose model has the lower loss on its
      train split (one ``query.scores`` message, as in routing). Until 2026-12 such members
      stayed with the half that kept the id; under 20 % participation on FedDAG Dist I that
      ended with 16 clusters, ARI 0.07 and 64.3 % (now: 6 clusters, ARI 0.93, 95.4 %; see
      docs/benchmarks/feddag-fmnist-notes.md).
    * The paper's optional post-split check on the cross-cluster similarity (``alpha_max``) is not
      applied; the value is logged and kept in ``self.splits``.
    * eps values (run-config ``cfl-eps1`` / ``cfl-eps2``, defaults 0.4 / 1.6 from the paper) are
      ABSOLUTE L2 norms of whole-model updates, so they must be scaled to the model, learning
      rate and local epochs. Measured on digits with LeNet-5 (lr 0.05, momentum 0.9, 5 local
      epochs, first round from the init, 6 clients): update norms 0.25-0.46 (mean-update norm
      0.16) under ``px`` level 2, 1.3-2.8 (mean 0.80) under ``label-skew`` with rho 0.5; the init
      itself has norm 8.9. With the paper's eps2 = 1.6 a ``px`` federation never splits. Every
      round's ``(mean, max)`` norm per cluster is written to results.json (``cfl_norms``) so eps
      can be set from a pilot run (``scripts/cfl_pilot.py``). The paper's ``cfl-min-round = 20``
      means no split in runs of 20 rounds or fewer; the FMNIST benchmark protocols use eps1 0.4,
      eps2 0.6 and min-round 3 from such pilots (docs/DECISIONS.md).

Routing (held-out nodes at the end, late nodes when they join)
    The cluster whose model has the lowest loss on the node's own labelled TRAIN split
    (``query.scores``); before the first split there is one cluster and no message is sent.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from flux_app.common.params import State, clone_state, flat_params
from flux_app.engine.registry import register_strategy
from flux_app.engine.routing import route_by_loss
from flux_app.engine.strategy import ClusteredStrategy, Reply
from flux_app.methods.cfl.config import CflConfig
from flux_app.methods.cfl.split import bipartition, cross_similarity, should_split, update_norms

logger = logging.getLogger("flwr")


@register_strategy("cfl")
class Cfl(ClusteredStrategy):
    """CFL on the strategy base: hooks ``setup``, ``aggregate`` (FedAvg, then the split check),
    ``after_round`` (norms in the round's row) and ``route`` (lowest loss)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opts = self.cfg.section(CflConfig)
        self.splits: list[dict[str, Any]] = []
        self.round_norms: dict[int, tuple[float, float]] = {}

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {**super().state_dict(), "cfl_splits": self.splits}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        self.splits = list(state["cfl_splits"])

    def setup(self) -> None:
        """One cluster, every training node in it (recorded so results.json has a clustering)."""
        super().setup()
        self.record_clustering(0)

    def aggregate(self, server_round: int, replies: list[Reply]) -> None:
        """FedAvg per cluster, then CFL's split check on every cluster's updates."""
        self.round_norms = {}
        sent = {r.cluster: self.models[r.cluster] for r in replies}
        super().aggregate(server_round, replies)
        by_cluster: dict[int, list[Reply]] = defaultdict(list)
        for r in replies:
            by_cluster[r.cluster].append(r)
        for cid, rs in sorted(by_cluster.items()):
            base = flat_params(sent[cid])
            updates = np.stack([flat_params(r.state) - base for r in rs])
            weights = np.array([r.num_examples for r in rs], dtype=np.float64)
            members = [r.node_id for r in rs]
            states = [r.state for r in rs]
            if self.maybe_split(server_round, cid, members, updates, weights, states, sent[cid]):
                self.place_absent(server_round, cid, self.splits[-1]["new_cluster"], set(members))

    def place_absent(self, server_round: int, kept: int, new: int, present: set[int]) -> None:
        """Members of a split cluster that sat the round out pick the half whose model has the
        lower loss on their train split (the two half models differ: each is its own FedAvg)."""
        absent = sorted(n for n, z in self.assignment.items() if z == kept and n not in present)
        if not absent:
            return
        placed = route_by_loss(
            self, absent, {kept: self.models[kept], new: self.models[new]}, server_round
        )
        for n, z in placed.items():
            self.assignment[n] = z
        self.splits[-1]["absent_placed"] = [
            sum(1 for z in placed.values() if z == kept),
            sum(1 for z in placed.values() if z == new),
        ]
        self.record_clustering(server_round, splits=list(self.splits))

    def maybe_split(
        self,
        server_round: int,
        cluster: int,
        node_ids: Sequence[int],
        updates: np.ndarray,
        weights: np.ndarray | None = None,
        states: Sequence[State] | None = None,
        sent: State | None = None,
    ) -> bool:
        """Apply CFL's criterion to one cluster; split it in two when it holds.

        Parameters
        ----------
        server_round : int
            The round just aggregated (splits wait for ``cfl-min-round``).
        cluster : int
            The cluster id; its model must already be the round's average.
        node_ids : Sequence[int]
            The participating members, one per row of ``updates``.
        updates : np.ndarray
            ``[n, m]`` flattened updates (trained minus sent).
        weights : np.ndarray, optional
            Sample counts (default uniform).
        states : Sequence[State], optional
            The members' trained models, one per row of ``updates``. Given, each half's model
            becomes the FedAvg of its own members (the paper's per-cluster aggregation after a
            split); without them both halves keep the cluster's current model.
        sent : State, optional
            The model the cluster sent this round (what a server optimiser steps from).

        Returns
        -------
        bool
            Whether the cluster was split. The half holding ``node_ids[0]`` keeps the id, the
            other half gets the next free id.
        """
        mean_norm, max_norm = update_norms(updates, weights)
        self.round_norms[cluster] = (mean_norm, max_norm)
        cfg = self.opts
        if server_round < cfg.min_round or len(node_ids) <= 2:
            return False
        if not should_split(updates, cfg.eps1, cfg.eps2, weights):
            return False
        keep, move = bipartition(updates)
        new_id = max(self.models) + 1
        if states is None:
            self.models[new_id] = clone_state(self.models[cluster])
        else:
            w = np.ones(len(node_ids)) if weights is None else weights
            for cid, half in ((cluster, keep), (new_id, move)):
                idx = [int(i) for i in half]
                self.models[cid] = self.combine(
                    cid, [states[i] for i in idx], w[idx].tolist(), server_round, current=sent
                )
        for i in move:
            self.assignment[node_ids[int(i)]] = new_id
        alpha = cross_similarity(updates, keep, move)
        split = {
            "round": server_round,
            "cluster": cluster,
            "new_cluster": new_id,
            "sizes": [len(keep), len(move)],
            "mean_norm": mean_norm,
            "max_norm": max_norm,
            "cross_similarity": alpha,
        }
        self.splits.append(split)
        logger.info(
            "cfl round %d: split cluster %d (mean norm %.3g < %.3g, max norm %.3g > %.3g) into "
            "%d + %d, max cross-similarity %.3f",
            server_round,
            cluster,
            mean_norm,
            cfg.eps1,
            max_norm,
            cfg.eps2,
            len(keep),
            len(move),
            alpha,
        )
        self.phase = "split"
        self.record_clustering(server_round, splits=list(self.splits))
        return True

    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        """The round's per-cluster (mean, max) update norms, to calibrate eps1 / eps2."""
        row["cfl_norms"] = {str(c): [m, x] for c, (m, x) in sorted(self.round_norms.items())}

    def route(self, node_ids: list[int], server_round: int) -> dict[int, int | None]:
        """Lowest loss on the node's own train split (needs its labels)."""
        placed = route_by_loss(self, node_ids, self.models, server_round)
        return {n: placed.get(n) for n in node_ids}

    def final_metrics(self) -> dict[str, Any]:  # noqa: D102
        return {"cfl_splits": list(self.splits)}


__all__ = ["Cfl"]
