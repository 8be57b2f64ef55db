"""PACFL (Vahidian et al., AAAI 2023): one-shot clustering by principal angles of data subspaces.

Paper mechanics
    Before training, every client sends, per class it holds, the top-``p`` left singular vectors
    of its raw (flattened) data. The server's proximity of two clients is the smallest principal
    angle between the spans of their vectors; agglomerative clustering (average linkage) cut at a
    distance threshold gives the clusters, whose number is not given in advance. Each cluster
    then trains its own model with FedAvg from the common init. A newcomer sends its vectors and
    joins the cluster the same linkage rule would put it in.

Our decisions
    * The query is ``query.subspaces`` (:mod:`flux_app.methods.pacfl.client`) with ``p`` =
      ``pacfl-subspace-dim``; its uploads are the descriptor bytes of results.json. The
      proximity is :func:`flux_app.common.subspaces.pacfl_proximity` ("span" mode, in DEGREES), so
      ``pacfl-threshold`` is an angle in degrees; ``<= 0`` (default) picks the middle of the
      largest gap of the dendrogram (:func:`flux_app.common.agglomerative.pacfl_auto_threshold`), since
      the paper tunes the threshold per dataset. The threshold used is stored and recorded.
      The automatic rule is a convenience, not the paper: it recovers the digits rotations and
      FLUX's px groups, but on the FedDAG Dist I partitions the widest "gap" is the one between
      the last merge and the largest pairwise angle, so it returns one cluster (FMNIST: within-
      group angles 0.7-5 deg, between groups 3-38 deg). The benchmark protocols therefore set
      ``pacfl-threshold`` from a pilot on a non-evaluation seed (``scripts/pacfl_threshold.py``).
    * Every reply is validated (:meth:`ClassSubspaces.from_arrays`: shape ``[C, d, p]``, finite,
      orthonormal, consistent ranks and counts). A node with a missing or invalid reply is kept
      out of the clustering (``self.excluded`` with the reason, in results.json) and trains with
      the LARGEST cluster (ties: lowest id): before training all cluster models are the same
      init, so nothing better than the majority is known about it.
    * With no valid reply at all the run falls back to one global model (FedAvg), logged.

Routing (held-out nodes at the end, late nodes when they join)
    The node sends its subspaces; its distance to every clustered node is the same principal
    angle, and :func:`flux_app.common.agglomerative.assign_newcomer` (average linkage) places it at the
    stored threshold. When that would open a NEW cluster, the node goes to the nearest existing
    cluster (lowest average angle) instead: a fresh cluster would have an untrained model. This
    uses only the node's train inputs and labels (its class split of the data), no model.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from flux_app.common.agglomerative import assign_newcomer, threshold_clusters
from flux_app.common.params import clone_state
from flux_app.common.records import get_array_record, record_to_arrays
from flux_app.common.statecodec import NodeList
from flux_app.common.subspaces import ClassSubspaces, client_span, pacfl_proximity
from flux_app.engine.registry import register_strategy
from flux_app.engine.strategy import ClusteredStrategy
from flux_app.methods.pacfl.config import PacflConfig

logger = logging.getLogger("flwr")

SUBSPACES = "query.subspaces"
LINKAGE = "average"


def span_angles(span: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
    """Smallest principal angle (degrees) between ``span`` and each of ``others``.

    The same formula as :func:`pacfl_proximity` (``arccos`` of the largest singular value of
    ``U_a^T U_b``); an empty span is at 90 degrees from everything.
    """
    out = np.full(len(others), 90.0)
    if span.shape[1] == 0:
        return out
    for j, q in enumerate(others):
        if q.shape[1]:
            cos = float(np.linalg.svd(span.T @ q, compute_uv=False)[0])
            out[j] = float(np.degrees(np.arccos(np.clip(cos, 0.0, 1.0))))
    return out


@register_strategy("pacfl")
class Pacfl(ClusteredStrategy):
    """PACFL on the strategy base: hooks ``setup`` (the one-shot clustering) and ``route``."""

    descriptor_types = (SUBSPACES,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opts = self.cfg.section(PacflConfig)
        self.threshold: float | None = None
        #: clustered nodes (by partition id), their labels and the spans of their subspaces
        self.clustered: list[int] = []
        self.labels = np.zeros(0, dtype=np.int64)
        self.spans: list[np.ndarray] = []

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        own = {"threshold": self.threshold, "labels": self.labels, "spans": self.spans}
        return {**super().state_dict(), "pacfl": own | {"clustered": NodeList(self.clustered)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        own = state["pacfl"]
        self.threshold, self.labels = own["threshold"], own["labels"]
        self.spans, self.clustered = list(own["spans"]), list(own["clustered"])

    # ------------------------------------------------------------------ the query
    def collect_subspaces(
        self, node_ids: list[int], server_round: int
    ) -> dict[int, ClassSubspaces]:
        """Ask ``node_ids`` for their class subspaces; the valid ones, reasons for the others."""
        p = self.opts.subspace_dim
        payload = RecordDict({"config": ConfigRecord({"server-round": server_round, "p": p})})

        def parse(n: int, content: RecordDict) -> ClassSubspaces:
            info = self.nodes[n]
            arrays = record_to_arrays(get_array_record(content, "subspaces"))
            return ClassSubspaces.from_arrays(
                arrays, dim=int(np.prod(info.input_shape)), num_classes=info.num_classes, p=p
            )

        return self.collect(
            SUBSPACES, {n: payload for n in node_ids}, server_round, parse, what="subspaces"
        )

    # ------------------------------------------------------------------ clustering
    def setup(self) -> None:
        """One-shot clustering before round 1; every cluster starts from the common init."""
        init = self.initial_model()
        trainers = self.training_nodes()
        subs = self.collect_subspaces(trainers, 0)
        ids = self.ordered(subs)
        if not ids:
            logger.warning("pacfl: no valid subspaces; training one global model")
            self.models = {0: init}
            self.assignment = {n: 0 for n in trainers}
            self.record_clustering(0, threshold=None)
            return
        proximity = pacfl_proximity([subs[n] for n in ids])
        labels, self.threshold = threshold_clusters(proximity, self.opts.threshold, LINKAGE)
        self.clustered, self.labels = ids, labels
        self.spans = [client_span(subs[n]) for n in ids]
        self.models = {int(z): clone_state(init) for z in np.unique(labels)}
        self.assignment = {n: int(z) for n, z in zip(ids, labels, strict=True)}
        largest = self._largest()
        for n in trainers:
            if n not in self.assignment:  # invalid reply: see the module docstring
                self.assignment[n] = largest
        logger.info(
            "pacfl: %d node(s) in %d cluster(s) at threshold %.2f deg (%s), %d excluded",
            len(ids),
            len(self.models),
            self.threshold,
            "auto" if self.opts.threshold <= 0 else "configured",
            len(trainers) - len(ids),
        )
        self.phase = "cluster"
        self.record_clustering(
            0,
            threshold=self.threshold,
            auto_threshold=self.opts.threshold <= 0,
            bytes_descriptor_up=self.traffic[SUBSPACES]["up"],
        )

    def _largest(self) -> int:
        """The cluster with the most clustered nodes (ties: lowest id)."""
        counts = Counter(int(z) for z in self.labels)
        return min(counts, key=lambda z: (-counts[z], z))

    # ------------------------------------------------------------------ routing
    def route(self, node_ids: list[int], server_round: int) -> dict[int, int | None]:
        """Place nodes by their subspaces at the stored threshold (see the module docstring)."""
        if not node_ids:
            return {}
        if self.threshold is None:  # no clustering happened: the one global model
            return {n: 0 for n in node_ids}
        subs = self.collect_subspaces(node_ids, server_round)
        out: dict[int, int | None] = {n: None for n in node_ids}
        for n, sub in subs.items():
            row = span_angles(client_span(sub), self.spans)
            z = assign_newcomer(row, self.labels, self.threshold, LINKAGE)
            if z not in self.models:  # would open a cluster without a trained model
                means = {int(k): float(row[self.labels == k].mean()) for k in self.models}
                z = min(means, key=lambda k: (means[k], k))
            out[n] = int(z)
        return out


__all__ = ["Pacfl", "span_angles"]
