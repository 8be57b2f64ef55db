"""FedDAG's one-shot clustering of the warmed-up nodes: fused distances, the alpha sweep and
the complementarity graph, from what the nodes sent. A pure function of the replies."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flux_app.common.agglomerative import SweepResult, alpha_sweep
from flux_app.common.subspaces import ClassSubspaces, pairwise_class_angles
from flux_app.methods.feddag.complementarity import ComplementarityGraph, complementarity_graph
from flux_app.methods.feddag.config import FeddagConfig
from flux_app.methods.feddag.similarity import FeddagDistances, feddag_distances


@dataclass
class FeddagFit:
    """The clustering and what routing newcomers needs later (the clustered population)."""

    ids: list[int]
    subspaces: list[ClassSubspaces]
    sketches: np.ndarray
    distances: FeddagDistances
    sweep: SweepResult
    labels: list[int]
    #: learner cluster -> the source clusters its secondary encoder learns from
    sources: dict[int, list[int]] = field(default_factory=dict)
    graph: ComplementarityGraph | None = None

    @property
    def num_clusters(self) -> int:
        """Number of clusters found."""
        return max(self.labels) + 1


def fit_feddag(
    ids: list[int],
    subspaces: list[ClassSubspaces],
    sketches: np.ndarray,
    opts: FeddagConfig,
) -> FeddagFit:
    """Cluster the nodes ``ids`` (one subspace set and sketch each) as ``opts`` say."""
    angles = pairwise_class_angles(subspaces)
    distances = feddag_distances(
        subspaces, sketches, opts.similarity, opts.delta, class_angles=angles
    )
    sweep = alpha_sweep(
        distances.a,
        step=opts.alpha_step,
        lam=opts.lambda_,
        linkage=opts.linkage,
        pick=opts.alpha_pick,
    )
    fit = FeddagFit(ids, subspaces, sketches, distances, sweep, [int(z) for z in sweep.labels])
    if opts.variant == "dual":
        counts = np.stack([s.counts for s in subspaces])
        fit.graph = complementarity_graph(np.asarray(fit.labels), counts, angles, top_k=opts.top_k)
        fit.sources = {int(k): [int(q) for q in v] for k, v in fit.graph.sources.items()}
    elif opts.variant == "dagger":
        fit.sources = {z: [z] for z in range(fit.num_clusters)}
    return fit


__all__ = ["FeddagFit", "fit_feddag"]
