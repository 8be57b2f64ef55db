"""Oracle: clusters are the ground-truth shift groups (simulation only); FedAvg inside each."""

from __future__ import annotations

from typing import Any

from flux_app.common.params import clone_state
from flux_app.engine.registry import register_strategy
from flux_app.engine.strategy import ClusteredStrategy


@register_strategy("oracle")
class Oracle(ClusteredStrategy):
    """The ceiling a clustering method should approach: it reads the nodes' true groups, which
    no other method may do. Held-out and late nodes go to their group's cluster."""

    def setup(self) -> None:  # noqa: D102
        unknown = [self.nodes[n].name for n in self.training_nodes() if self.nodes[n].group < 0]
        if unknown:
            raise ValueError(
                f"oracle needs every node's ground-truth group (simulated data, or a group.txt in a "
                f"site's data folder); unknown for {unknown[:5]}"
            )
        groups = sorted({self.nodes[n].group for n in self.training_nodes()})
        self.cluster_of_group = {g: i for i, g in enumerate(groups)}
        init = self.initial_model()
        self.models = {i: clone_state(init) for i in self.cluster_of_group.values()}
        self.assignment = {
            n: self.cluster_of_group[self.nodes[n].group] for n in self.training_nodes()
        }
        self.record_clustering(0)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {**super().state_dict(), "cluster_of_group": self.cluster_of_group}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        self.cluster_of_group = {int(g): int(c) for g, c in state["cluster_of_group"].items()}

    def route(self, node_ids: list[int], server_round: int) -> dict[int, int | None]:  # noqa: D102
        return {n: self.cluster_of_group.get(self.nodes[n].group) for n in node_ids}  # -1: None
