"""Local: every node trains alone (no aggregation)."""

from __future__ import annotations

from flux_app.common.params import clone_state
from flux_app.engine.registry import register_strategy
from flux_app.engine.strategy import ClusteredStrategy


@register_strategy("local")
class Local(ClusteredStrategy):
    """Each training node is its own cluster, starting from the common initial model.

    The base's per-cluster average of one reply is that reply, so nothing is aggregated across
    nodes. A node that never trained has no model of its own: held-out nodes are not routable
    (``accuracy_holdout`` is null), late nodes start a fresh cluster of their own.
    """

    def setup(self) -> None:  # noqa: D102
        init = self.initial_model()
        self.assignment = {n: i for i, n in enumerate(self.training_nodes())}
        self.models = {i: clone_state(init) for i in self.assignment.values()}

    def route(self, node_ids: list[int], server_round: int) -> dict[int, int | None]:  # noqa: D102
        return {n: None for n in node_ids}

    def new_cluster_for(self, node_id: int) -> int:  # noqa: D102
        cid = max(self.models) + 1
        self.models[cid] = self.initial_model()
        return cid
