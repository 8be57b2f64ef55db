"""Oracle: clusters are the ground-truth shift groups (simulation only); FedAvg inside each."""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import RecordDict

from flux_app.common.params import clone_state
from flux_app.engine.nodes import INFO, parse_info
from flux_app.engine.registry import register_strategy
from flux_app.engine.strategy import ClusteredStrategy

logger = logging.getLogger("flwr")


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

    def before_round(self, server_round: int) -> None:
        """With simulated drift (``drift-round``), the Oracle knows the switch: at that round it
        asks the training nodes for their info again and moves each to its new group's cluster."""
        if self.cfg.drift_round <= 0 or server_round != self.cfg.drift_round:
            return
        nodes = self.training_nodes()
        got = self._transport().collect(
            INFO,
            {n: RecordDict() for n in nodes},
            server_round,
            lambda n, content: parse_info(n, content, self.cfg.model_input),
            what="info reply",
        )
        moved = []
        for n, info in got.items():
            if info.group != self.nodes[n].group and info.group in self.cluster_of_group:
                self.nodes[n].group = info.group
                self.assignment[n] = self.cluster_of_group[info.group]
                moved.append(self.nodes[n].name)
        logger.info(
            "oracle: round %d, drifted node(s) moved to their new group: %s", server_round, moved
        )

    def route(self, node_ids: list[int], server_round: int) -> dict[int, int | None]:  # noqa: D102
        return {n: self.cluster_of_group.get(self.nodes[n].group) for n in node_ids}  # -1: None
