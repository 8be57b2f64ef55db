"""FedDAG's cluster-training phases of the dual-encoder model (a mixin of the strategy).

Primary phase: sampled nodes train primary encoder + head of their cluster's model, the
secondary frozen; the cluster combines them (``cluster-aggregator``), the secondary stays
bit-identical. Secondary phase: for each source cluster q, its sampled nodes train phi2' = the
mean of q's learners' secondary encoders through q's frozen primary and head; the
sample-weighted mean delta is added to every learner's secondary encoder.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from flux_app.common.params import State, weighted_average
from flux_app.methods.feddag.dual import add_delta, secondary_delta, secondary_parts, source_model

if TYPE_CHECKING:  # pragma: no cover
    from flux_app.engine.strategy import Reply

#: train config of the two phases (generic train options: which sub-modules learn, and a tag
#: that keeps the phases' batch orders apart)
PRIMARY_PHASE = {"trainable": "primary.,head.", "seed-tag": "primary"}
SECONDARY_PHASE = {"trainable": "secondary.", "seed-tag": "secondary"}


class DualPhases:
    """Primary and secondary phases; the strategy provides ``models``, ``assignment``,
    ``sources``, ``dual_model``, ``opts``, ``rounds_since_clustering`` and the engine helpers."""

    def secondary_due(self) -> bool:
        """The K:1 schedule: every round when ``feddag-schedule-k`` is 0."""
        k = self.opts.schedule_k
        return k <= 0 or self.rounds_since_clustering % (k + 1) == 0

    def aggregate_primary(self, replies: list[Reply], server_round: int) -> None:
        """FedAvg inside each cluster; for dual models only primary + head change."""
        by_cluster: dict[int, list[Reply]] = defaultdict(list)
        for r in replies:
            by_cluster[r.cluster].append(r)
        for z, rs in by_cluster.items():
            avg = self.combine(z, [r.state for r in rs], [r.num_examples for r in rs], server_round)
            if self.dual_model:  # the frozen secondary stays bit-identical
                for k in avg:
                    if k.startswith("secondary."):
                        avg[k] = self.models[z][k]
            self.models[z] = avg

    def learners_of(self, source: int) -> list[int]:
        """Clusters that learn from ``source``'s data."""
        return sorted(p for p, qs in self.sources.items() if source in qs)

    def secondary_phase(self, server_round: int, sampled: list[int]) -> None:
        """Sources' nodes train the learners' averaged secondary encoder; deltas go to learners."""
        snapshot = secondary_parts(self.models)
        sent: dict[int, State] = {}
        contents = {}
        for n in sampled:
            q = self.assignment[n]
            learners = self.learners_of(q)
            if not learners:
                continue
            if q not in sent:
                sent[q] = source_model(self.models[q], [snapshot[p] for p in learners])
            contents[n] = self.model_content(sent[q], server_round, **SECONDARY_PHASE)
        if not contents:
            return
        sent_to = {n: sent[self.assignment[n]] for n in contents}
        replies = self.collect_trained(contents, server_round, sent_to)
        deltas: dict[int, list[tuple[State, int]]] = defaultdict(list)
        for r in replies:
            deltas[r.cluster].append(
                (
                    secondary_delta(r.state, sent[r.cluster], list(snapshot[r.cluster])),
                    r.num_examples,
                )
            )
        for q, items in deltas.items():
            mean_delta = weighted_average([d for d, _ in items], [w for _, w in items])
            for p in self.learners_of(q):
                add_delta(self.models[p], mean_delta)


__all__ = ["PRIMARY_PHASE", "SECONDARY_PHASE", "DualPhases"]
