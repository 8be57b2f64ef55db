"""Agglomerative clustering on a precomputed distance (FedDAG alpha sweep, PACFL threshold).

One dendrogram per distance matrix (scipy, deterministic), cut at distance thresholds: a cut at
``t`` keeps every merge whose linkage height is ``<= t``. Labels are canonical: ``0..Z-1`` in order
of each cluster's first client.

FedDAG chooses the threshold ``alpha`` by sweeping it (0.05 steps up to 1) and scoring each
partition with the federated-aware loss ``L = L1 + lambda * L2``:

- ``L1 = sum_z (1/|C_z|^2) sum_{i,j in C_z} A_ij`` (mean within-cluster distance, summed over
  clusters);
- ``L2 = (1/Z) sum_z exp(max(0, N/Z - gamma * std(sizes) - |C_z|) / tau)`` (penalises clusters
  much smaller than the average).

Why the paper's "lowest loss" does not pick the partition on its own (``pick="lowest-loss"``,
run-config ``feddag-alpha-pick = "lowest-loss"``; ``"paper"`` is an alias): with
``A_ii = 0`` every singleton has ``L1 = 0`` and the all-singletons partition has ``L2 = 1``, so the
global minimum ``L = lambda`` is "everyone alone"; and because ``L1`` sums a mean per cluster it
grows with the number of clusters, so with noisy within-cluster distances even one big cluster
beats the true K once K >= ~5. On planted block matrices (4 blocks of 15, within-block distances up
to 0.3 of the range) "min loss, then largest alpha within 1e-3" returns 39-48 clusters (ARI
<= 0.08) in 10 of 10 seeds; it only works when every within-cluster linkage height is below the
first alpha (0.05). The paper picks "low loss and few clusters" by eye.

Our deterministic rule (``pick="stable"``, default) keeps the sweep and the loss and formalises
that reading: the partition the sweep returns for the LONGEST run of consecutive alphas (the most
stable cut of the dendrogram, a standard lifetime criterion); ties are broken by the lower loss,
then by the larger alpha (fewer clusters). The reported alpha is the largest alpha of that run
(``alpha_range`` gives the whole run; for newcomers store ``newcomer_alpha``, the middle of the
exact dendrogram interval giving that partition). On the same kind of planted matrices it recovers
K in 10/10 seeds (5 in the tests) for K in {2, 3, 4, 5, 10}, unequal sizes and unequal tightness,
and returns one cluster on pure noise with 30+ clients (tests/test_agglomerative.py). The L2 term
cannot rescue the paper's rule: L2 >= 1 with equality for every balanced partition, including
all-singletons, and lambda = 0.01 makes it negligible next to L1. ``scripts/alpha_pick_study.py``
compares the two rules on synthetic federations (docs/DECISIONS.md, FedDAG).

Linkage (``feddag-linkage``). The FedDAG paper says "average linkage"; the authors' code calls
scipy's ``linkage(method="weighted")``, i.e. WPGMA: after merging ``i`` and ``j``,
``d(ij, k) = (d(i, k) + d(j, k)) / 2`` whatever the sizes, so a cluster's distance to others
weighs each member by ``2^-depth`` in the cluster's own merge tree (:func:`linkage_weights`).
UPGMA (``"average"``, our default, unchanged) weighs every member equally. Both give monotone
merge heights, so the same threshold cuts apply. Newcomers follow the same linkage
(:func:`assign_newcomer` with the tree weights for WPGMA).
"""

from __future__ import annotations

# scipy is imported inside the functions that use them: server-only work, kept off
# the ClientApp's import path (a deployment message starts a fresh process).
from dataclasses import dataclass

import numpy as np

from flux_app.common.statecodec import state_type

__all__ = [
    "LINKAGES",
    "PICKS",
    "SweepResult",
    "agglomerative_labels",
    "alpha_sweep",
    "assign_newcomer",
    "canonical_labels",
    "cluster_distances",
    "dendrogram",
    "federated_loss",
    "linkage_weights",
    "pacfl_auto_threshold",
    "threshold_clusters",
]

#: Linkages valid on an arbitrary precomputed distance (monotone merge heights).
LINKAGES = ("average", "complete", "single", "weighted")
#: Pick rules of :func:`alpha_sweep` (``"paper"`` is accepted as an alias of ``"lowest-loss"``).
PICKS = ("stable", "lowest-loss")


def _check_distance(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError("distance matrix must be square")
    if not np.all(np.isfinite(a)):
        raise ValueError("distance matrix contains non-finite values")
    if np.any(a < 0):
        raise ValueError("distance matrix has negative entries")
    if not np.allclose(a, a.T, atol=1e-9):
        raise ValueError("distance matrix is not symmetric")
    a = 0.5 * (a + a.T)
    np.fill_diagonal(a, 0.0)
    return a


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel to ``0..Z-1`` in order of first appearance (int64)."""
    labels = np.asarray(labels).reshape(-1)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # rank of each unique label by first appearance
    return order[inverse].astype(np.int64)


def dendrogram(a: np.ndarray, linkage: str = "average") -> np.ndarray:
    """scipy linkage matrix of a precomputed distance (``n >= 2``)."""
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}")
    a = _check_distance(a)
    if a.shape[0] < 2:
        raise ValueError("a dendrogram needs at least two clients")
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    return scipy_linkage(squareform(a, checks=False), method=linkage)


def _cut(z: np.ndarray | None, n: int, threshold: float) -> np.ndarray:
    if n == 1 or z is None:
        return np.zeros(n, dtype=np.int64)
    from scipy.cluster.hierarchy import fcluster

    return canonical_labels(fcluster(z, t=threshold, criterion="distance"))


def agglomerative_labels(a: np.ndarray, threshold: float, linkage: str = "average") -> np.ndarray:
    """Clusters of a precomputed distance cut at ``threshold`` (merges with height <= threshold).

    Parameters
    ----------
    a : np.ndarray
        Symmetric ``[n, n]`` distance, zero diagonal.
    threshold : float
        Distance threshold (FedDAG's alpha).
    linkage : {"average", "complete", "single", "weighted"}

    Returns
    -------
    np.ndarray
        int64 ``[n]`` canonical labels. ``n = 1`` gives ``[0]``; ``n = 2`` merges iff
        ``a[0, 1] <= threshold``.
    """
    a = _check_distance(a)
    n = a.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return _cut(dendrogram(a, linkage) if n > 1 else None, n, threshold)


def federated_loss(
    a: np.ndarray, labels: np.ndarray, lam: float = 0.01, gamma: float = 1.0, tau: float = 1.0
) -> tuple[float, float, float]:
    """FedDAG's partition score ``(L, L1, L2)`` with ``L = L1 + lam * L2`` (see module doc).

    ``std(sizes)`` is the population standard deviation of the cluster sizes.
    """
    a = np.asarray(a, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if a.shape != (labels.size, labels.size):
        raise ValueError("labels do not match the distance matrix")
    ids, sizes = np.unique(labels, return_counts=True)
    n, z = labels.size, ids.size
    l1 = 0.0
    for k, s in zip(ids, sizes, strict=True):
        members = labels == k
        l1 += float(a[np.ix_(members, members)].sum()) / float(s * s)
    excess = np.maximum(0.0, n / z - gamma * np.std(sizes) - sizes)
    l2 = float(np.mean(np.exp(excess / tau)))
    return l1 + lam * l2, l1, l2


@state_type
@dataclass(frozen=True)
class SweepResult:
    """Outcome of :func:`alpha_sweep`.

    Attributes
    ----------
    alphas, losses, l1, l2 : np.ndarray
        ``[m]`` the thresholds tried and the loss terms of each partition.
    num_clusters : np.ndarray
        int64 ``[m]``.
    partitions : np.ndarray
        int64 ``[m, n]`` canonical labels per alpha.
    index : int
        Index of the chosen alpha.
    alpha : float
        The chosen threshold (store it to place newcomers).
    alpha_range : tuple[float, float]
        First and last alpha giving the chosen partition.
    labels : np.ndarray
        int64 ``[n]`` the chosen partition.
    pick : str
        The rule used ("stable" or "lowest-loss").
    merge_gap : tuple[float, float]
        The exact interval of thresholds giving the chosen partition: from the highest merge
        inside it (0 if none) to the next merge of the dendrogram (1.0 if none).
    newcomer_alpha : float
        The middle of ``merge_gap``: the threshold to store for placing newcomers with
        :func:`assign_newcomer`. The largest grid alpha sits just under the next merge, so it
        would let a newcomer join a cluster while being almost as far from it as two existing
        clusters are from each other.
    """

    alphas: np.ndarray
    losses: np.ndarray
    l1: np.ndarray
    l2: np.ndarray
    num_clusters: np.ndarray
    partitions: np.ndarray
    index: int
    alpha: float
    alpha_range: tuple[float, float]
    labels: np.ndarray
    pick: str
    merge_gap: tuple[float, float]
    newcomer_alpha: float

    @property
    def num_chosen(self) -> int:
        """Number of clusters of the chosen partition."""
        return int(self.num_clusters[self.index])


def _alpha_grid(step: float, stop: float = 1.0) -> np.ndarray:
    if not 0.0 < step <= stop:
        raise ValueError("step must be in (0, stop]")
    k = int(np.floor(stop / step + 1e-9))
    grid = np.round(np.arange(1, k + 1) * step, 10)
    if grid.size == 0 or grid[-1] < stop - 1e-9:
        grid = np.append(grid, stop)
    return grid


def alpha_sweep(
    a: np.ndarray,
    step: float = 0.05,
    tolerance: float = 1e-3,
    lam: float = 0.01,
    gamma: float = 1.0,
    tau: float = 1.0,
    linkage: str = "average",
    pick: str = "stable",
) -> SweepResult:
    """FedDAG's threshold sweep with a deterministic pick.

    Parameters
    ----------
    a : np.ndarray
        Fused distance ``[n, n]`` in ``[0, 1]``.
    step : float
        Alphas are ``step, 2 step, ...`` up to and including 1.0.
    tolerance : float
        Relative tolerance on losses: two losses are "equal" when they differ by at most
        ``tolerance * max(1, |L|)``.
    lam, gamma, tau : float
        Loss parameters (FedDAG: 0.01, 1, 1).
    linkage : str
        Agglomerative linkage, one of :data:`LINKAGES` (FedDAG: ``"average"`` = UPGMA, our
        default; the authors' code: ``"weighted"`` = WPGMA).
    pick : {"stable", "lowest-loss"}
        ``"stable"`` (default): the partition of the longest run of consecutive alphas; ties ->
        lower loss -> larger alpha. ``"lowest-loss"`` (the paper's rule; ``"paper"`` is an
        alias): among alphas whose loss is within the tolerance of the minimum, the largest
        alpha (degenerate on noisy distances, see module doc).

    Returns
    -------
    SweepResult
        The sweep and the chosen partition (``pick`` holds the canonical rule name).
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, not {linkage!r}")
    pick = "lowest-loss" if pick == "paper" else pick
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS} (or 'paper'), not {pick!r}")
    a = _check_distance(a)
    n = a.shape[0]
    if n == 0:
        raise ValueError("no clients to cluster")
    alphas = _alpha_grid(step)
    z = dendrogram(a, linkage) if n > 1 else None
    parts = np.stack([_cut(z, n, float(al)) for al in alphas])
    scores = np.array([federated_loss(a, lab, lam, gamma, tau) for lab in parts])
    losses, l1, l2 = scores[:, 0], scores[:, 1], scores[:, 2]
    counts = parts.max(axis=1) + 1

    def close(x: float, y: float) -> bool:
        return abs(x - y) <= tolerance * max(1.0, abs(x), abs(y))

    # Runs of consecutive alphas with the same partition: (start, end) inclusive.
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(alphas) + 1):
        if i == len(alphas) or not np.array_equal(parts[i], parts[start]):
            runs.append((start, i - 1))
            start = i
    if pick == "lowest-loss":
        best = float(losses.min())
        index = int(max(i for i in range(len(alphas)) if close(losses[i], best)))
    else:  # "stable"
        longest = max(e - s for s, e in runs)
        cands = [(s, e) for s, e in runs if e - s == longest]
        low = min(losses[s] for s, _ in cands)
        cands = [(s, e) for s, e in cands if close(losses[s], low)]
        index = cands[-1][1]  # runs are in increasing alpha: last = largest alpha
    run = next((s, e) for s, e in runs if s <= index <= e)
    heights = np.sort(z[:, 2]) if z is not None else np.zeros(0)
    chosen = float(alphas[index])
    below, above = heights[heights <= chosen], heights[heights > chosen]
    gap = (float(below.max()) if below.size else 0.0, float(above.min()) if above.size else 1.0)
    gap = (gap[0], max(gap))
    return SweepResult(
        alphas=alphas,
        losses=losses,
        l1=l1,
        l2=l2,
        num_clusters=counts.astype(np.int64),
        partitions=parts,
        index=index,
        alpha=float(alphas[index]),
        alpha_range=(float(alphas[run[0]]), float(alphas[run[1]])),
        labels=parts[index].copy(),
        pick=pick,
        merge_gap=gap,
        newcomer_alpha=0.5 * (gap[0] + gap[1]),
    )


def linkage_weights(a: np.ndarray, labels: np.ndarray, linkage: str = "weighted") -> np.ndarray:
    """Weight of each client in its cluster's linkage distance to an outside client.

    Parameters
    ----------
    a : np.ndarray
        Symmetric ``[n, n]`` distance the clusters were cut from.
    labels : np.ndarray
        ``[n]`` the clusters, a cut of ``a``'s dendrogram with this linkage (as
        :func:`alpha_sweep` and :func:`agglomerative_labels` return).
    linkage : str
        ``"weighted"`` (WPGMA): every merge inside a cluster halves the weights of both merged
        parts, so a member at depth ``k`` of the cluster's merge tree weighs ``2^-k``; then
        ``d(x, C) = sum_i w_i d(x, i)`` is exactly WPGMA's ``d(x, C)`` by its update rule
        ``d(ij, x) = (d(i, x) + d(j, x)) / 2``. Any other linkage: ``1 / |C|`` (UPGMA's mean).

    Returns
    -------
    np.ndarray
        ``[n]`` float64 weights summing to 1 over each cluster. Should ``labels`` not be a cut
        (a cluster spread over several subtrees), each subtree's weights are rescaled so that
        the subtrees count equally.
    """
    a = _check_distance(a)
    labels = np.asarray(labels).reshape(-1)
    n = a.shape[0]
    if labels.shape != (n,):
        raise ValueError("labels do not match the distance matrix")
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}")
    w = np.ones(n)
    if linkage == "weighted" and n > 1:
        members: list[np.ndarray] = [np.array([i]) for i in range(n)]
        for left, right in dendrogram(a, "weighted")[:, :2].astype(np.int64):
            both = np.concatenate([members[left], members[right]])
            if np.all(labels[both] == labels[both[0]]):  # a merge inside one cluster
                w[both] *= 0.5
            members.append(both)
    _, inverse = np.unique(labels, return_inverse=True)
    return w / np.bincount(inverse, weights=w)[inverse]


def cluster_distances(
    a_row: np.ndarray,
    labels: np.ndarray,
    linkage: str = "average",
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Linkage distance from one outside client to each cluster.

    Parameters
    ----------
    a_row : np.ndarray
        ``[n]`` distances from the client to the clustered clients.
    labels : np.ndarray
        ``[n]`` cluster labels of those clients.
    linkage : str
        ``"average"`` (mean), ``"complete"`` (max), ``"single"`` (min) or ``"weighted"``
        (``sum_i w_i a_row[i]`` with the WPGMA ``weights`` of :func:`linkage_weights`).
    weights : np.ndarray, optional
        ``[n]`` required with ``"weighted"`` (a WPGMA distance depends on the cluster's merge
        order, which the labels alone do not hold), refused with any other linkage.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        The sorted cluster ids and the distance to each.
    """
    a_row = np.asarray(a_row, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if a_row.shape != labels.shape:
        raise ValueError("a_row and labels differ in length")
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}")
    if not np.all(np.isfinite(a_row)):
        raise ValueError("a_row contains non-finite values")
    if (linkage == "weighted") != (weights is not None):
        raise ValueError("weights (from linkage_weights) go with linkage='weighted' only")
    ids = np.unique(labels)
    if linkage == "weighted":
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != labels.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights must be [n] finite and >= 0")
        dist = [float(w[labels == k] @ a_row[labels == k] / w[labels == k].sum()) for k in ids]
    else:
        reduce = {"average": np.mean, "complete": np.max, "single": np.min}[linkage]
        dist = [float(reduce(a_row[labels == k])) for k in ids]
    return ids, np.asarray(dist, dtype=np.float64)


def assign_newcomer(
    a_row: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    linkage: str = "average",
    weights: np.ndarray | None = None,
) -> int:
    """Place one new client by a single linkage pass at a stored threshold.

    Parameters
    ----------
    a_row : np.ndarray
        ``[n]`` distances from the newcomer to the clustered clients (same scale as the
        threshold).
    labels : np.ndarray
        ``[n]`` cluster labels of those clients.
    threshold : float
        The stored cut (FedDAG's chosen alpha, PACFL's threshold).
    linkage : str
        How a client-to-cluster distance is formed (:func:`cluster_distances`): average (mean),
        complete (max), single (min), weighted (WPGMA, with ``weights``).
    weights : np.ndarray, optional
        ``[n]`` :func:`linkage_weights` of the clustered clients; required with ``"weighted"``.

    Returns
    -------
    int
        The label of the closest cluster when its linkage distance is ``<= threshold`` (ties ->
        smallest label), else ``max(labels) + 1`` (a new cluster).
    """
    labels = np.asarray(labels).reshape(-1)
    ids, dist = cluster_distances(a_row, labels, linkage, weights)
    if labels.size == 0:
        return 0
    best = int(np.argmin(dist))
    if dist[best] <= threshold:
        return int(ids[best])
    return int(labels.max()) + 1


def pacfl_auto_threshold(a: np.ndarray, linkage: str = "average") -> float:
    """A threshold for PACFL when none is configured: the middle of the largest dendrogram gap.

    With merge heights ``h_1 <= ... <= h_{n-1}`` the partition into ``k`` clusters lives on
    ``[h_{n-k}, h_{n-k+1})``; the gaps considered are ``[0, h_1)`` (everyone alone),
    ``[h_k, h_{k+1})`` and ``[h_{n-1}, max(a)]`` (one cluster). The longest-lived partition is the
    most stable one (same criterion as FedDAG's ``pick="stable"``); ties -> fewer clusters. With
    fewer than two clients the threshold is 0.
    """
    a = _check_distance(a)
    n = a.shape[0]
    if n < 2:
        return 0.0
    heights = np.sort(dendrogram(a, linkage)[:, 2])
    edges = np.concatenate([[0.0], heights, [max(float(a.max()), float(heights[-1]))]])
    gaps = np.diff(edges)
    k = int(np.flatnonzero(gaps >= gaps.max() - 1e-12)[-1])  # ties: the larger threshold
    return float(0.5 * (edges[k] + edges[k + 1]))


def threshold_clusters(
    a: np.ndarray, threshold: float, linkage: str = "average"
) -> tuple[np.ndarray, float]:
    """PACFL: agglomerative clusters of the proximity matrix at a distance threshold.

    A ``threshold <= 0`` asks for :func:`pacfl_auto_threshold`. Returns ``(labels, threshold)``
    with the threshold actually used (store it to route newcomers with
    :func:`assign_newcomer`).
    """
    if threshold <= 0:
        threshold = pacfl_auto_threshold(a, linkage)
    return agglomerative_labels(a, threshold, linkage), float(threshold)
