"""hist-kmeans: a clustered method written outside the package, as a plug-in.

Each client sends its label histogram (a client action of its own, ``query.label_histogram``);
the server clusters the normalised histograms with k-means, choosing K in 2..``hist-kmeans-k-max``
by the silhouette score (one cluster when every histogram is the same), and trains one model
per cluster. Newcomers go to the nearest centroid of their own histogram.

Run it (docs/EXTENDING.md)::

    flwr run . -c 'plugins="examples.hist_kmeans" strategy="hist-kmeans"
                   plugin-config="hist-kmeans-k-max=4" shift="label-skew"'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from flwr.app import RecordDict
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from flux_app.common.params import clone_state
from flux_app.common.records import ReplyError, arrays_to_record, get_array_record, record_to_arrays
from flux_app.engine import (
    ClientRuntime,
    ClusteredStrategy,
    ConfigSection,
    register_config,
    register_query,
    register_strategy,
)

HISTOGRAM = "query.label_histogram"


@register_config
@dataclass(frozen=True)
class HistKMeansConfig(ConfigSection):
    """``hist-kmeans-k-max``: the largest K tried."""

    prefix: ClassVar[str] = "hist-kmeans-"
    k_max: int = 6

    def validate(self) -> None:  # noqa: D102
        self.check(self.k_max >= 2, "k_max", ">= 2")


@register_query("label_histogram")
def handle_histogram(content: RecordDict, rt: ClientRuntime) -> RecordDict:
    """Client side: the counts of each label in the node's train split."""
    counts = np.bincount(rt.data.y_train.numpy(), minlength=rt.data.num_classes)
    return RecordDict({"histogram": arrays_to_record({"counts": counts.astype(np.int64)})})


@register_strategy("hist-kmeans")
class HistKMeans(ClusteredStrategy):
    """Label histograms, k-means, K by silhouette; one model per cluster."""

    def setup(self) -> None:  # noqa: D102
        k_max = self.cfg.section(HistKMeansConfig).k_max
        hists = self.histograms(self.training_nodes(), 0)
        ids = self.ordered(hists)
        x = np.stack([hists[n] for n in ids])
        labels = np.zeros(len(ids), dtype=int)
        best = -1.0
        for k in range(2, min(k_max, len(ids) - 1) + 1):
            cand = KMeans(n_clusters=k, n_init=10, random_state=self.cfg.seed).fit_predict(x)
            if len(set(cand)) > 1 and (score := silhouette_score(x, cand)) > best:
                best, labels = score, cand
        init = self.initial_model()
        self.models = {int(z): clone_state(init) for z in set(labels)}
        self.assignment = {n: int(z) for n, z in zip(ids, labels, strict=True)}
        self.centroids = {int(z): x[labels == z].mean(axis=0) for z in set(labels)}
        for n in self.training_nodes():  # no valid histogram: the largest cluster
            self.assignment.setdefault(n, self.largest_cluster())
        self.record_clustering(0, silhouette=best, k_max=k_max)

    def histograms(self, node_ids: list[int], server_round: int) -> dict[int, np.ndarray]:
        """Validated, normalised label histograms of ``node_ids``."""

        def parse(node_id: int, content: RecordDict) -> np.ndarray:
            counts = record_to_arrays(get_array_record(content, "histogram"))["counts"]
            classes = self.nodes[node_id].num_classes
            if counts.shape != (classes,) or counts.dtype.kind not in "iu" or counts.min() < 0:
                raise ReplyError(f"histogram must be {classes} non-negative integers")
            if counts.sum() <= 0:
                raise ReplyError("empty histogram")
            return counts / counts.sum()

        contents = {n: RecordDict() for n in node_ids}
        return self.collect(HISTOGRAM, contents, server_round, parse, what="label histogram")

    def route(self, node_ids: list[int], server_round: int) -> dict[int, int | None]:  # noqa: D102
        hists = self.histograms(node_ids, server_round) if node_ids else {}
        out: dict[int, int | None] = {n: None for n in node_ids}
        for n, h in hists.items():
            out[n] = min(self.centroids, key=lambda z: float(np.sum((self.centroids[z] - h) ** 2)))
        return out
