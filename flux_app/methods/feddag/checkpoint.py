"""FedDAG's part of a checkpoint: the sweep, distances, complementarity graph and the clustered
population (per node: its class subspaces and update sketch, which place newcomers)."""

from __future__ import annotations

from typing import Any

import numpy as np

from flux_app.common.statecodec import NodeKeyed


class FeddagCheckpoint:
    """``state_dict`` / ``load_state_dict`` / ``checkpoint_ready`` of :class:`FedDag` (a mixin
    placed before the strategy base)."""

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        population = None
        if self.population is not None:  # per node, so nodes that are not back drop together
            ids, subs, sketches = self.population
            population = NodeKeyed({n: (subs[i], sketches[i]) for i, n in enumerate(ids)})
        own = {
            "init": self.init,
            "clustered": self.clustered,
            "sweep": self.sweep,
            "distances": self.distances,
            "graph": self.graph,
            "sources": self.sources,
            "population": population,
            "rounds_since_clustering": self.rounds_since_clustering,
        }
        return {**super().state_dict(), "feddag": own}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        own = state["feddag"]
        self.init, self.clustered = own["init"], bool(own["clustered"])
        self.sweep, self.distances, self.graph = own["sweep"], own["distances"], own["graph"]
        self.sources = {int(p): [int(q) for q in qs] for p, qs in own["sources"].items()}
        self.rounds_since_clustering = int(own["rounds_since_clustering"])
        self.population = None
        if own["population"]:
            ids = list(own["population"])
            pairs = [own["population"][n] for n in ids]
            self.population = (ids, [p[0] for p in pairs], np.stack([p[1] for p in pairs]))

    def checkpoint_ready(self, server_round: int) -> bool:
        """Not after the last warm-up round: its update sketches live on the nodes until the
        next round's clustering, and a resumed run's nodes start afresh."""
        return server_round != self.warmup_rounds


__all__ = ["FeddagCheckpoint"]
