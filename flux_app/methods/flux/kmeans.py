"""kmeans-flux: a FLUX variant, the same descriptors clustered by k-means with a given K.

Everything else (warm-up, the descriptor query and its validation, per-cluster training,
label-free routing of held-out nodes, metrics, outputs) is inherited from :class:`Flux`. The
benchmark harness leaves it out of its grids (it is FLUX told K, for comparisons run by hand);
docs/EXTENDING.md shows another variant written as a plug-in (examples/flux_ward.py).
"""

from __future__ import annotations

# scikit-learn is imported inside the functions that use them: server-only work, kept off
# the ClientApp's import path (a deployment message starts a fresh process).
from flux_app.engine.registry import register_strategy
from flux_app.methods.flux.clustering import BlockNormaliser, FluxClustering, embed
from flux_app.methods.flux.descriptors import FluxDescriptor
from flux_app.methods.flux.strategy import Flux


@register_strategy("kmeans-flux")
class KMeansFlux(Flux):
    """FLUX with k-means (K = run-config ``num-clusters``) in place of HDBSCAN."""

    def fit_clusters(self, descriptors: list[FluxDescriptor]) -> FluxClustering:
        normaliser = BlockNormaliser.fit(descriptors)
        x = embed(descriptors, normaliser, self.opts.missing_penalty)
        k = min(self.cfg.num_clusters, len(descriptors))
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=k, n_init=10, random_state=self.cfg.seed).fit_predict(x)
        return FluxClustering.from_labels(
            x,
            labels,
            normaliser,
            2 * descriptors[0].dim,
            missing_penalty=self.opts.missing_penalty,
            method="kmeans",
        )
