"""CFL (Sattler et al., 2020): when and how to split a cluster by its clients' updates.

A cluster has converged to a stationary point of its joint objective when the (weighted) mean
update is small, yet some clients still move a lot: then their objectives disagree and the cluster
is split in two by the cosine similarity of their updates (complete-linkage agglomerative
clustering on cosine distance ``1 - cos``, cut into two groups).
"""

from __future__ import annotations

# scipy is imported inside the functions that use them: server-only work, kept off
# the ClientApp's import path (a deployment message starts a fresh process).
import numpy as np

__all__ = [
    "bipartition",
    "cosine_similarity_matrix",
    "cross_similarity",
    "should_split",
    "update_norms",
]


def _updates(updates: np.ndarray) -> np.ndarray:
    u = np.asarray(updates, dtype=np.float64)
    if u.ndim != 2:
        raise ValueError("updates must be [n, m]")
    if not np.all(np.isfinite(u)):
        raise ValueError("updates contain non-finite values")
    return u


def cosine_similarity_matrix(updates: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity ``[n, n]`` in ``[-1, 1]``, diagonal 1.

    A zero update has no direction: its similarity to every other update is 0.
    """
    u = _updates(updates)
    norms = np.linalg.norm(u, axis=1)
    unit = np.divide(u, norms[:, None], out=np.zeros_like(u), where=norms[:, None] > 0)
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    sim = 0.5 * (sim + sim.T)
    np.fill_diagonal(sim, 1.0)
    return sim


def update_norms(updates: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """``(norm of the weighted mean update, max individual update norm)``.

    ``weights`` (e.g. sample counts) are normalised to sum to 1; default uniform.
    """
    u = _updates(updates)
    if u.shape[0] == 0:
        return 0.0, 0.0
    if weights is None:
        wt = np.full(u.shape[0], 1.0 / u.shape[0])
    else:
        wt = np.asarray(weights, dtype=np.float64).reshape(-1)
        if wt.shape[0] != u.shape[0] or np.any(wt < 0) or wt.sum() <= 0:
            raise ValueError("weights must be non-negative, one per update, not all zero")
        wt = wt / wt.sum()
    mean_norm = float(np.linalg.norm(wt @ u))
    max_norm = float(np.linalg.norm(u, axis=1).max())
    return mean_norm, max_norm


def should_split(
    updates: np.ndarray, eps1: float, eps2: float, weights: np.ndarray | None = None
) -> bool:
    """CFL's split criterion: mean update norm ``< eps1`` AND max update norm ``> eps2``.

    Clusters of fewer than two clients never split.
    """
    u = _updates(updates)
    if u.shape[0] < 2:
        return False
    mean_norm, max_norm = update_norms(u, weights)
    return mean_norm < eps1 and max_norm > eps2


def bipartition(updates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split clients in two by complete-linkage clustering on cosine distance.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Sorted int64 indices of the two groups; the group holding client 0 comes first. Both are
        non-empty (the two children of the dendrogram's root).
    """
    u = _updates(updates)
    n = u.shape[0]
    if n < 2:
        raise ValueError("need at least two updates to bipartition")
    dist = np.clip(1.0 - cosine_similarity_matrix(u), 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    from scipy.cluster.hierarchy import linkage, to_tree
    from scipy.spatial.distance import squareform

    root = to_tree(linkage(squareform(dist, checks=False), method="complete"))
    a = np.sort(np.asarray(root.get_left().pre_order(), dtype=np.int64))
    b = np.sort(np.asarray(root.get_right().pre_order(), dtype=np.int64))
    return (a, b) if a[0] == 0 else (b, a)


def cross_similarity(updates: np.ndarray, idx_a: np.ndarray, idx_b: np.ndarray) -> float:
    """Largest cosine similarity between an update of group a and one of group b.

    CFL's guarantee needs this to be small (the split separates disagreeing clients).
    """
    sim = cosine_similarity_matrix(updates)
    return float(sim[np.ix_(np.asarray(idx_a), np.asarray(idx_b))].max())
