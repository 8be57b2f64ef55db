"""FedDAG's cluster complementarity graph: which clusters a cluster should learn from.

A learner cluster ``p`` needs help on the classes its clients hold few samples of (demand); a
source cluster ``q`` can help on the classes its clients hold many samples of (supply), when the
two clusters see those classes alike (alignment of their class subspaces).

For client ``i`` with ``m_i`` present classes, ``r_ic`` is the rank of class ``c`` by local count,
ascending, among ITS present classes (0 = rarest; ties broken by class index).

- demand ``d_pc = sum_{i in p, c present at i} (m_i - r_ic)`` (the rarest class weighs ``m_i``,
  the most common 1; classes a client lacks contribute nothing: its local test set only has its
  own classes);
- supply ``s_qc = mean_{j in q} (r_jc + 1)`` with absent classes counting 0;
- alignment ``G_pqc = mean_{i in p, j in q} (1 - angle_c(i, j) / 90)`` over pairs where BOTH
  clients hold ``c``; pairs where either lacks ``c`` contribute 0 (our choice: the per-class angle
  convention "neither holds c -> 0 degrees" would count such pairs as perfectly aligned although
  there is no data to transfer);
- ``H_pq = sum_c d_pc s_qc G_pqc`` for ``q != p``.

Each learner keeps its top-``k`` sources (``k`` capped at ``Z - 1``; ties -> smaller cluster
index). An edge ``p -> q`` means "cluster p learns from cluster q's data".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flux_app.common.statecodec import state_type

__all__ = ["ComplementarityGraph", "class_ranks", "complementarity_graph"]


def class_ranks(counts: np.ndarray) -> np.ndarray:
    """``r`` ``[n, C]``: rank of each present class by count ascending (ties by class index).

    Absent classes get ``-1``.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or np.any(counts < 0):
        raise ValueError("counts must be a non-negative [n, C] array")
    ranks = np.full(counts.shape, -1, dtype=np.int64)
    for i, row in enumerate(counts):
        present = np.flatnonzero(row > 0)
        order = present[np.argsort(row[present], kind="stable")]
        ranks[i, order] = np.arange(order.size)
    return ranks


@state_type
@dataclass(frozen=True)
class ComplementarityGraph:
    """Sources per learner cluster, plus the scores behind them.

    Attributes
    ----------
    cluster_ids : list[int]
        The distinct labels, sorted; row/column ``k`` of ``h`` is ``cluster_ids[k]``.
    h : np.ndarray
        ``[Z, Z]`` complementarity ``H_pq`` (diagonal set to 0, never selected).
    demand, supply : np.ndarray
        ``[Z, C]``.
    alignment : np.ndarray
        ``[Z, Z, C]``.
    sources : dict[int, list[int]]
        Learner label -> its source labels, best first.
    """

    cluster_ids: list[int]
    h: np.ndarray
    demand: np.ndarray
    supply: np.ndarray
    alignment: np.ndarray
    sources: dict[int, list[int]]

    def learners_of(self, source: int) -> list[int]:
        """Learner clusters that take ``source`` as a source (FedDAG's ``L(z)``), sorted."""
        return sorted(p for p, qs in self.sources.items() if source in qs)


def complementarity_graph(
    labels: np.ndarray, counts: np.ndarray, class_angles: np.ndarray, top_k: int = 2
) -> ComplementarityGraph:
    """Build FedDAG's complementarity graph.

    Parameters
    ----------
    labels : np.ndarray
        ``[n]`` cluster label per client.
    counts : np.ndarray
        ``[n, C]`` per-client class counts.
    class_angles : np.ndarray
        ``[n, n, C]`` per-class principal angles in degrees
        (:func:`flux_app.common.subspaces.pairwise_class_angles`).
    top_k : int
        Sources kept per learner (capped at ``Z - 1``; ``Z = 1`` gives no edges).
    """
    labels = np.asarray(labels).reshape(-1)
    counts = np.asarray(counts)
    class_angles = np.asarray(class_angles, dtype=np.float64)
    n = labels.size
    if counts.ndim != 2 or counts.shape[0] != n:
        raise ValueError("counts must be [n, C] with one row per label")
    c = counts.shape[1]
    if class_angles.shape != (n, n, c):
        raise ValueError(f"class_angles {class_angles.shape} != {(n, n, c)}")
    if top_k < 0:
        raise ValueError("top_k must be >= 0")
    ids = sorted(int(k) for k in np.unique(labels))
    z = len(ids)
    ranks = class_ranks(counts)
    present = ranks >= 0
    m = present.sum(axis=1, keepdims=True)
    client_demand = np.where(present, m - ranks, 0)  # [n, C]
    client_supply = np.where(present, ranks + 1, 0)  # [n, C]
    both = present[:, None, :] & present[None, :, :]
    pair_align = np.where(both, 1.0 - np.clip(class_angles, 0.0, 90.0) / 90.0, 0.0)

    members = [labels == k for k in ids]
    demand = np.stack([client_demand[mk].sum(axis=0) for mk in members]).astype(np.float64)
    supply = np.stack([client_supply[mk].mean(axis=0) for mk in members])
    alignment = np.zeros((z, z, c))
    for p, mp in enumerate(members):
        rows = pair_align[mp]
        for q, mq in enumerate(members):
            alignment[p, q] = rows[:, mq].mean(axis=(0, 1))
    h = np.einsum("pc,qc,pqc->pq", demand, supply, alignment)
    np.fill_diagonal(h, 0.0)

    k = min(top_k, z - 1)
    sources: dict[int, list[int]] = {}
    for p in range(z):
        others = [q for q in range(z) if q != p]
        # Highest H first; ties -> smaller index (stable sort on negated scores).
        order = sorted(others, key=lambda q, p=p: (-h[p, q], q))
        sources[ids[p]] = [ids[q] for q in order[:k]]
    return ComplementarityGraph(
        cluster_ids=ids, h=h, demand=demand, supply=supply, alignment=alignment, sources=sources
    )
