"""flux-ward: a FLUX variant as a plug-in, the same descriptors clustered by Ward linkage.

Everything of FLUX (warm-up, trigger, descriptor query and validation, per-cluster training,
label-free routing) is inherited; only :meth:`fit_clusters` changes. K = run-config
``num-clusters``.
"""

from __future__ import annotations

from sklearn.cluster import AgglomerativeClustering

from flux_app.engine import register_strategy
from flux_app.methods.flux import Flux
from flux_app.methods.flux.clustering import BlockNormaliser, FluxClustering, embed


@register_strategy("flux-ward")
class FluxWard(Flux):
    """FLUX descriptors, Ward agglomerative clustering with K = ``num-clusters``."""

    def fit_clusters(self, descriptors):  # noqa: D102
        normaliser = BlockNormaliser.fit(descriptors)
        x = embed(descriptors, normaliser, self.opts.missing_penalty)
        k = min(self.cfg.num_clusters, len(descriptors))
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
        return FluxClustering.from_labels(
            x, labels, normaliser, 2 * descriptors[0].dim, method="ward"
        )
