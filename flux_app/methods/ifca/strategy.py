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

Loss-based placement (:func:`flux_app.engine.routing.route_by_loss`) is shared with CFL and FeSEM.
"""

from __future__ import annotations

import logging
from typing import Any

from flux_app.engine.registry import register_strategy
from flux_app.engine.routing import SCORES, route_by_loss
from flux_app.engine.strategy import ClusteredStrategy

logger = logging.getLogger("flwr")


@register_strategy("ifca")
class Ifca(ClusteredStrategy):
    """IFCA on the strategy base: hooks ``setup``, ``select_nodes`` (the loss-based choice),
    ``route`` and ``final_metrics`` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.selection_bytes_down = 0

    def setup(self) -> None:
        """K distinct seeded models; a round-robin placeholder until each node's first choice."""
        k = self.cfg.num_clusters
        self.models = {j: self.seeded_model(j) for j in range(k)}
        self.assignment = {n: i % k for i, n in enumerate(self.training_nodes())}

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {**super().state_dict(), "selection_bytes_down": self.selection_bytes_down}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        self.selection_bytes_down = int(state["selection_bytes_down"])

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

    def route(self, node_ids: list[int], server_round: int) -> dict[int, int | None]:
        """Lowest loss on the node's own train split (needs its labels)."""
        placed = route_by_loss(self, node_ids, self.models, server_round)
        return {n: placed.get(n) for n in node_ids}

    def final_metrics(self) -> dict[str, Any]:
        """Model downloads include the K-model selection broadcast of every round."""
        return {
            "bytes_selection_down": self.selection_bytes_down,
            "bytes_model_down": self.traffic["train"]["down"] + self.selection_bytes_down,
        }


__all__ = ["Ifca"]
