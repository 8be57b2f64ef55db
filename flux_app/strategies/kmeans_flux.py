"""Example of a new clustered method in ~30 lines: FLUX descriptors, k-means with a given K.

Everything else (warm-up, the descriptor query and its validation, per-cluster training,
label-free routing of held-out nodes, metrics, outputs) is inherited. docs/EXTENDING.md walks
through it.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from flux_app.flux_clustering import BlockNormaliser, FluxClustering, embed
from flux_app.flux_descriptors import FluxDescriptor
from flux_app.strategies.flux import Flux


class KMeansFlux(Flux):
    """FLUX with k-means (K = run-config ``num-clusters``) in place of HDBSCAN."""

    name = "kmeans-flux"

    def fit_clusters(self, descriptors: list[FluxDescriptor]) -> FluxClustering:
        normaliser = BlockNormaliser.fit(descriptors)
        x = embed(descriptors, normaliser, self.cfg.flux_missing_penalty)
        k = min(self.cfg.num_clusters, len(descriptors))
        labels = KMeans(n_clusters=k, n_init=10, random_state=self.cfg.seed).fit_predict(x)
        labels = np.unique(labels, return_inverse=True)[1]  # 0..Z-1 without gaps
        centroids = np.stack([x[labels == z].mean(axis=0) for z in range(labels.max() + 1)])
        k_dim = descriptors[0].dim
        return FluxClustering(
            labels=labels,
            num_clusters=len(centroids),
            centroids=centroids,
            label_free_centroids=centroids[:, : 2 * k_dim],
            normaliser=normaliser,
            missing_penalty=self.cfg.flux_missing_penalty,
            method="kmeans",
        )
