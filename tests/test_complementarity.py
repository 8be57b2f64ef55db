"""FedDAG cluster complementarity graph."""

from __future__ import annotations

import numpy as np
import pytest

from flux_app.common.subspaces import ClassSubspaces, pairwise_class_angles
from flux_app.methods.feddag.complementarity import class_ranks, complementarity_graph

D, C = 12, 4
E = np.eye(D)


def _client(counts: list[int], bases: dict[int, np.ndarray]) -> ClassSubspaces:
    b = np.zeros((C, D, 2), dtype=np.float32)
    r = np.zeros(C, dtype=np.int64)
    for k, u in bases.items():
        b[k, :, : u.shape[1]] = u
        r[k] = u.shape[1]
    return ClassSubspaces(bases=b, ranks=r, counts=np.array(counts, dtype=np.int64))


def _population(class3_of_cluster1: np.ndarray, class3_of_cluster2: np.ndarray):
    common = {k: E[:, 2 * k : 2 * k + 2] for k in range(3)}
    own3 = E[:, 6:8]
    clients = [
        # Cluster 0: classes 0-2 plentiful, class 3 rare (present: it is in the local test set).
        _client([300, 200, 250, 3], {**common, 3: own3}),
        _client([280, 220, 260, 5], {**common, 3: own3}),
        # Cluster 1: rich in class 3 but sees it differently (orthogonal subspace).
        _client([50, 0, 0, 400], {0: common[0], 3: class3_of_cluster1}),
        _client([60, 0, 0, 500], {0: common[0], 3: class3_of_cluster1}),
        # Cluster 2: rich in class 3 and aligned with cluster 0.
        _client([50, 0, 0, 400], {0: common[0], 3: class3_of_cluster2}),
        _client([60, 0, 0, 500], {0: common[0], 3: class3_of_cluster2}),
    ]
    labels = np.array([0, 0, 1, 1, 2, 2])
    counts = np.stack([c.counts for c in clients])
    return labels, counts, pairwise_class_angles(clients)


def test_class_ranks() -> None:
    r = class_ranks(np.array([[5, 0, 2, 5], [0, 0, 0, 1]]))
    assert r.tolist() == [[1, -1, 0, 2], [-1, -1, -1, 0]]  # ties by class index


def test_learner_picks_the_aligned_rich_source() -> None:
    labels, counts, angles = _population(E[:, 8:10], E[:, 6:8])
    graph = complementarity_graph(labels, counts, angles, top_k=1)
    assert graph.sources == {0: [2], 1: [0], 2: [0]}
    assert graph.h[0, 2] > graph.h[0, 1] > 0
    assert np.all(np.diag(graph.h) == 0)
    assert graph.learners_of(2) == [0] and graph.learners_of(0) == [1, 2]
    # Demand of cluster 0 for class 3 (rarest of 4 present classes at both clients): 2 * (4 - 0).
    assert graph.demand[0, 3] == 8
    # Supply of cluster 2 for class 3 (most common of its 2 classes): mean of (1 + 1) = 2.
    assert graph.supply[2, 3] == 2 and graph.supply[2, 1] == 0
    assert graph.alignment[0, 2, 3] == pytest.approx(1.0, abs=1e-6)
    assert graph.alignment[0, 1, 3] == pytest.approx(0.0, abs=1e-6)
    assert graph.alignment[0, 1, 1] == 0.0  # cluster 1 has no class 1: nothing to align


def test_symmetric_sources_tie_to_smaller_index() -> None:
    labels, counts, angles = _population(E[:, 8:10], E[:, 8:10])
    graph = complementarity_graph(labels, counts, angles, top_k=1)
    assert graph.h[0, 1] == pytest.approx(graph.h[0, 2])
    assert graph.sources[0] == [1]


def test_top_k_capping_and_labels() -> None:
    labels, counts, angles = _population(E[:, 8:10], E[:, 6:8])
    graph = complementarity_graph(labels, counts, angles, top_k=5)
    assert all(len(v) == 2 for v in graph.sources.values())  # capped at Z - 1
    assert graph.sources[0] == [2, 1]
    relabelled = complementarity_graph(np.array([7, 7, 3, 3, 5, 5]), counts, angles, top_k=1)
    assert relabelled.cluster_ids == [3, 5, 7]
    assert relabelled.sources[7] == [5]
    single = complementarity_graph(np.zeros(6, dtype=int), counts, angles, top_k=2)
    assert single.sources == {0: []}
    with pytest.raises(ValueError):
        complementarity_graph(labels, counts, angles[:, :, :2])
