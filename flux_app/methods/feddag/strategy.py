"""FedDAG (Pramanik et al., ICLR 2026): data + gradient similarity, alpha sweep, dual encoders.

Schedule (rounds count toward ``num-server-rounds``)
    1. Warm-up, rounds ``1..feddag-warmup-rounds`` (t_g): every training node trains its own
       model from the common seeded init for ``feddag-warmup-epochs`` epochs per round, no
       federation. In the last warm-up round each node keeps the sketch of its update (the
       shared-seed ``feddag-sketch-fraction`` of coordinates) in its ``context.state``.
    2. Clustering, at the start of round t_g + 1 (one shot): ``query.feddag`` returns every
       node's sketch, per-class top-p subspaces of its raw inputs and class counts. The server
       builds the fused distance (:func:`feddag_distances`; ``feddag-similarity`` = fused | data |
       gradient), runs the alpha sweep (:func:`alpha_sweep` with ``feddag-linkage``, UPGMA by
       default, WPGMA as the authors' code; ``feddag-alpha-pick``: the deterministic "stable"
       pick by default, see flux_app/common/agglomerative.py for why the paper's "lowest loss,
       largest alpha" rule is only an option) and the complementarity graph (``feddag-top-k``
       sources per learner).
    3. Cluster training, every later round, on a ``fraction-train`` sample:
       primary phase: sampled nodes train primary encoder + head of their cluster's dual model,
       secondary frozen; FedAvg of (primary, head) inside the cluster. Secondary phase (every
       round, or once every ``feddag-schedule-k`` + 1 rounds when > 0, the K:1 schedule): for each
       source cluster q, the server sends phi2' = mean of q's learners' secondary encoders; q's
       sampled nodes train phi2' through q's frozen primary and head; the sample-weighted mean
       delta is added to every learner's secondary encoder.

Variants (``feddag-variant``): ``dual`` (FedDAG), ``single`` (FedDAG*: one encoder + head per
cluster, no sharing), ``dagger`` (FedDAG-dagger: dual encoder, the secondary learns only from its
own cluster).

Cluster model init: primary = sample-weighted mean of the members' warm-up encoders; secondary and
head fresh (seeded per cluster). FedDAG* starts from the weighted mean of the whole warm-up models.

Newcomers (late nodes and held-out nodes at the end) do the same warm-up on their own data,
send sketch + subspaces, fit only their own fusion weight, and are placed by one pass of the
sweep's linkage (member mean for UPGMA, merge-tree weights for WPGMA) at the stored threshold
(the sweep's ``newcomer_alpha``); a node that would open a new
cluster is served by the nearest cluster (a new cluster would have no trained model).

Metrics: ``accuracy_known`` is the final-round mean; ``accuracy_best_over_rounds`` (each client's
best accuracy over rounds, the optimistic metric of FedDAG's public code) is reported beside it,
labelled.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from flux_app.common.agglomerative import SweepResult, linkage_weights
from flux_app.common.params import State, clone_state, weighted_average
from flux_app.common.records import (
    ReplyError,
    check_state,
    from_record,
    get_array_record,
    get_metric,
    record_to_arrays,
)
from flux_app.common.seeding import derive_seed
from flux_app.common.subspaces import ClassSubspaces
from flux_app.engine.registry import register_strategy
from flux_app.engine.strategy import ClusteredStrategy, Reply
from flux_app.methods.feddag.checkpoint import FeddagCheckpoint
from flux_app.methods.feddag.client import SKETCH_HOOK
from flux_app.methods.feddag.complementarity import ComplementarityGraph
from flux_app.methods.feddag.config import FeddagConfig
from flux_app.methods.feddag.dual import (
    dual_cluster_model,
)
from flux_app.methods.feddag.fit import fit_feddag
from flux_app.methods.feddag.phases import PRIMARY_PHASE, DualPhases
from flux_app.methods.feddag.similarity import (
    FeddagDistances,
    newcomer_distances,
    place_newcomers,
)
from flux_app.methods.feddag.sketch import sketch_indices

logger = logging.getLogger("flwr")

MAX_SKETCH_VALUE = 1e6
FEDDAG = "query.feddag"


def read_feddag_reply(
    content: RecordDict, sketch_len: int, dim: int, num_classes: int, p: int
) -> tuple[ClassSubspaces, np.ndarray]:
    """A node's ``query.feddag`` reply, checked: (class subspaces, float64 sketch)."""
    sk = record_to_arrays(get_array_record(content, "sketch"))
    if set(sk) != {"sketch"}:
        raise ReplyError(f"sketch record keys {sorted(sk)}")
    vec = np.asarray(sk["sketch"])
    if vec.shape != (sketch_len,) or vec.dtype.kind != "f":
        raise ReplyError(
            f"sketch shape/dtype {vec.shape}/{vec.dtype}, expected ({sketch_len},) float"
        )
    if not np.isfinite(vec).all() or np.abs(vec).max(initial=0) > MAX_SKETCH_VALUE:
        raise ReplyError("sketch has non-finite or absurd values")
    subs = ClassSubspaces.from_arrays(
        record_to_arrays(get_array_record(content, "subspaces")),
        dim=dim,
        num_classes=num_classes,
        p=p,
    )
    return subs, vec.astype(np.float64)


@register_strategy("feddag")
class FedDag(FeddagCheckpoint, DualPhases, ClusteredStrategy):
    """FedDAG on the strategy base (see the module docstring)."""

    descriptor_types = (FEDDAG,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opts = self.cfg.section(FeddagConfig)
        self.variant = self.opts.variant
        self.dual_model = self.variant != "single"
        self.warmup_rounds = self.opts.warmup_rounds
        if self.cfg.num_server_rounds <= self.warmup_rounds:
            raise ValueError(
                f"feddag needs num-server-rounds ({self.cfg.num_server_rounds}) > "
                f"feddag-warmup-rounds ({self.warmup_rounds}): no round would be left to train clusters"
            )
        self.clustered = False
        self.sweep: SweepResult | None = None
        self.distances: FeddagDistances | None = None
        self.graph: ComplementarityGraph | None = None
        self.sources: dict[int, list[int]] = {}
        self.population: tuple[list[int], list[ClassSubspaces], np.ndarray] | None = None
        self.rounds_since_clustering = 0

    # ------------------------------------------------------------------ warm-up
    def setup(self) -> None:
        """Warm-up: every node its own model (from the common init), like Local."""
        self.init = self.initial_model()
        self.assignment = {n: i for i, n in enumerate(self.training_nodes())}
        self.models = {i: clone_state(self.init) for i in self.assignment.values()}

    def in_warmup(self, server_round: int) -> bool:
        """Rounds 1..feddag-warmup-rounds are local warm-up."""
        return server_round <= self.warmup_rounds

    def warmup_config(self, server_round: int) -> dict[str, Any]:
        """Train config of a warm-up round; the last one keeps the update sketch."""
        conf: dict[str, Any] = {"local-epochs": self.opts.warmup_epochs}
        if server_round == self.warmup_rounds:
            conf.update(
                {
                    "after-train": SKETCH_HOOK,
                    "sketch-fraction": self.opts.sketch_fraction,
                    "sketch-seed": self.opts.sketch_seed,
                }
            )
        return conf

    def select_nodes(self, server_round: int) -> list[int]:  # noqa: D102
        if self.in_warmup(server_round):
            return self.training_nodes_assigned()
        return super().select_nodes(server_round)

    def training_nodes_assigned(self) -> list[int]:
        """Every node that currently has a cluster (all trainers during warm-up)."""
        return self.ordered(self.assignment)

    def train_content(self, node_id: int, server_round: int) -> RecordDict:  # noqa: D102
        state = self.models[self.assignment[node_id]]
        if self.in_warmup(server_round):
            return self.model_content(state, server_round, **self.warmup_config(server_round))
        if not self.dual_model:
            return self.model_content(state, server_round)
        return self.model_content(state, server_round, **PRIMARY_PHASE)

    def screen_group(self, reply: Reply) -> Any:
        """During warm-up every node has its own model, trained alike: compared together."""
        return "warm-up" if not self.clustered else reply.cluster

    def new_cluster_for(self, node_id: int) -> int:
        """A node joining during warm-up warms up on its own, like the others."""
        cid = max(self.models) + 1
        self.models[cid] = clone_state(self.init)
        return cid

    # ------------------------------------------------------------------ clustering
    def before_round(self, server_round: int) -> None:  # noqa: D102
        if not self.clustered and server_round == self.warmup_rounds + 1:
            self.cluster_now(server_round)

    def sketch_length(self) -> int:
        """Number of coordinates every node's sketch must have."""
        num_params = sum(v.numel() for v in self.init.values() if v.is_floating_point())
        return len(sketch_indices(num_params, self.opts.sketch_fraction, self.opts.sketch_seed))

    def collect_feddag(
        self, node_ids: list[int], server_round: int
    ) -> dict[int, tuple[ClassSubspaces, np.ndarray]]:
        """``query.feddag`` to ``node_ids``; the valid (subspaces, sketch) pairs."""
        p = self.opts.subspace_dim
        payload = RecordDict({"config": ConfigRecord({"server-round": server_round, "p": p})})
        m = self.sketch_length()

        def parse(n: int, content: RecordDict) -> tuple[ClassSubspaces, np.ndarray]:
            info = self.nodes[n]
            return read_feddag_reply(
                content, m, int(np.prod(info.input_shape)), info.num_classes, p
            )

        return self.collect(
            FEDDAG, {n: payload for n in node_ids}, server_round, parse, what="feddag descriptor"
        )

    def cluster_now(self, server_round: int) -> None:
        """One-shot clustering after warm-up; builds the cluster models and the graph."""
        trainers = self.ordered(self.assignment)
        warm = {n: self.models[self.assignment[n]] for n in trainers}
        got = self.collect_feddag(trainers, server_round)
        ids = self.ordered(got)
        if not ids:
            raise RuntimeError("feddag: no node sent a valid sketch/subspaces; cannot cluster")
        subs = [got[n][0] for n in ids]
        fit = fit_feddag(ids, subs, np.stack([got[n][1] for n in ids]), self.opts)
        self.distances, self.sweep, self.graph, self.sources = (
            fit.distances,
            fit.sweep,
            fit.graph,
            fit.sources,
        )
        self.population = (ids, subs, fit.sketches)
        num_clusters = fit.num_clusters
        # Cluster models from the members' warm-up models.
        new_assignment = dict(zip(ids, fit.labels, strict=True))
        models: dict[int, State] = {}
        for z in range(num_clusters):
            members = [n for n in ids if new_assignment[n] == z]
            mean = weighted_average(
                [warm[n] for n in members], [self.nodes[n].num_train for n in members]
            )
            models[z] = self.cluster_model(mean, z) if self.dual_model else mean
        self.models = models
        self.aggregation.reset()  # new clusters: no aggregator state carries over
        self.assignment = new_assignment
        for n in trainers:  # no valid reply: the largest cluster
            if n not in self.assignment:
                self.assignment[n] = self._largest()
        self.clustered = True
        self.phase = "cluster"
        logger.info(
            "feddag: round %d clustered %d node(s) into %d cluster(s) at alpha=%.2f; sources %s",
            server_round,
            len(ids),
            num_clusters,
            self.sweep.alpha,
            self.sources,
        )
        self.record_clustering(
            server_round,
            alpha=self.sweep.alpha,
            newcomer_alpha=self.sweep.newcomer_alpha,
            similarity=self.opts.similarity,
            variant=self.variant,
            fusion_weight_mean=float(np.mean(self.distances.w)),
            graph_edges=[[int(p), int(q)] for p, qs in sorted(self.sources.items()) for q in qs],
            bytes_descriptor_up=self.traffic[FEDDAG]["up"],
        )

    def cluster_model(self, warm_mean: State, cluster: int) -> State:
        """Dual model: primary = warm-up encoder mean; secondary and head fresh (seeded)."""
        fresh = self._built(derive_seed(self.cfg.seed, "feddag-cluster", cluster), dual=True)
        return dual_cluster_model(warm_mean, fresh)

    def _largest(self) -> int:
        """The cluster with the most nodes (ties: the lowest id)."""
        sizes = Counter(self.assignment.values())
        return max(sizes, key=lambda z: (sizes[z], -z)) if sizes else 0

    # ------------------------------------------------------------------ cluster training
    def train_round(self, server_round: int) -> None:  # noqa: D102
        if self.in_warmup(server_round) or not self.clustered:
            super().train_round(server_round)
            if self.in_warmup(server_round):
                self.phase = "warmup"
            return
        self.rounds_since_clustering += 1
        sampled = self.select_nodes(server_round)
        contents = {n: self.train_content(n, server_round) for n in sampled}
        replies = self.collect_trained(contents, server_round)
        if replies:
            self.aggregate_primary(replies, server_round)
        phase = "primary"
        if self.dual_model and self.sources and self.secondary_due():
            self.secondary_phase(server_round, sampled)
            phase = "primary+secondary"
        self.phase = phase if self.phase != "cluster" else f"cluster+{phase}"

    # ------------------------------------------------------------------ routing and metrics
    def route(self, node_ids: list[int], server_round: int) -> dict[int, int | None]:
        """Newcomers: warm up, send sketch + subspaces, one pass at the stored threshold."""
        if not node_ids:
            return {}
        if not self.clustered:
            return {n: None for n in node_ids}
        rnd = server_round
        states = {n: clone_state(self.init) for n in node_ids}
        for w in range(1, self.warmup_rounds + 1):  # the same warm-up as the others had
            conf = self.warmup_config(w)
            contents = {n: self.model_content(states[n], rnd, **conf) for n in states}
            states = self.collect(
                "train", contents, rnd, self._warmed_up, what="newcomer warm-up", exclude=False
            )
        got = self.collect_feddag(list(states), rnd)
        out: dict[int, int | None] = {n: self._largest() for n in node_ids}
        if not got or self.population is None or self.distances is None or self.sweep is None:
            return out
        ids, subs, sketches = self.population
        new = self.ordered(got)
        rows, _ = newcomer_distances(
            self.distances.scales,
            new_subspaces=[got[n][0] for n in new],
            new_sketches=np.stack([got[n][1] for n in new]),
            subspaces=subs,
            sketches=sketches,
        )
        labels = np.asarray([self.assignment[n] for n in ids])
        linkage, weights = self.opts.linkage, None
        if linkage == "weighted":
            weights = self._wpgma_weights(labels)
        placed = place_newcomers(
            rows, labels, self.sweep.newcomer_alpha, list(self.models), linkage, weights
        )
        out.update(zip(new, placed, strict=True))
        return out

    def _wpgma_weights(self, labels: np.ndarray) -> np.ndarray:
        """WPGMA member weights of the clustered population (its dendrogram); with a population
        that no longer matches the stored distances (a resumed run whose nodes did not all come
        back) the tree is unknown and every member weighs the same (UPGMA's mean)."""
        a = self.distances.a if self.distances is not None else None
        if a is not None and a.shape[0] == labels.size:
            return linkage_weights(a, labels, "weighted")
        logger.warning(
            "feddag: clustered population changed since the sweep; newcomers use the member "
            "mean instead of WPGMA weights"
        )
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        return 1.0 / counts[inverse]

    def _warmed_up(self, node_id: int, content: RecordDict) -> State:
        return self.read_trained(Reply(node_id, content, None))[0]

    def read_trained(self, reply: Reply) -> tuple[State, int]:  # noqa: D102
        if reply.cluster is None:  # a newcomer's warm-up model: check against the init
            state = from_record(get_array_record(reply.content, "arrays"))
            check_state(self.init, state)
            return state, int(get_metric(reply.content, "metrics", "num-examples"))
        return super().read_trained(reply)

    def counts_for_best(self, server_round: int) -> bool:
        """Only cluster-model rounds: the warm-up evaluates each client's own local model."""
        return self.clustered and not self.in_warmup(server_round)

    def final_metrics(self) -> dict[str, Any]:  # noqa: D102
        return {
            "feddag_variant": self.variant,
            "feddag_alpha": None if self.sweep is None else self.sweep.alpha,
        }
