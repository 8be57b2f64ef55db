"""FedDAG's client distances: data distance V, gradient distance G and their per-client fusion A.

All three are distances in ``[0, 1]`` with a zero diagonal:

- ``G``: angle (degrees) between the clients' gradient sketches, min-max scaled over the
  off-diagonal entries.
- ``V``: for each class the principal angle between the two clients' class subspaces (90 when
  only one holds the class, 0 when neither does), times a quantity weight ``W_c`` that grows with
  the imbalance of the two class counts; averaged over all classes (in degrees) and then min-max
  scaled over the off-diagonal entries.
- ``A_ij = w_i G_ij + (1 - w_i) V_ij`` with a per-client weight ``w_i`` in ``[0, 1]`` chosen to
  make client ``i``'s row of ``A`` as decisive as possible (lowest entropy of the row-softmax),
  then symmetrised by mirroring the upper triangle.

Fusion objective (our reading, with a choice of sign). For row ``i`` let
``q_i = softmax_j(-A_ij / T)`` over ``j != i`` (the diagonal is excluded: a client is not its own
neighbour). ``q_i`` is an attention over neighbours that puts mass on the closest clients; its
entropy is low when a few clients are clearly closer than the rest. ``w`` minimises
``mean_i H(q_i)``. Rows are independent (``w_i`` only enters row ``i`` before symmetrisation), so a
newcomer can fit its own ``w`` from its own distance row. We use ``-A`` (similarity) rather than
``+A``: with ``+A`` the mass sits on the FARTHEST clients and, with many clusters, pure noise can
score a lower entropy than a perfectly clustered matrix (see ``tests/test_feddag_similarity.py``).

What to expect: a row's entropy is roughly ``ln(n - 1) - Var_j(A_ij) / (2 T^2)`` and the variance of
a mix of two independent distances is below that of the more spread one, so the optimum usually
sits at an end of ``[0, 1]``: each client mostly picks the distance whose row is more structured.
The paper's alternative (a tiny MLP, Adam at 1e-3 for 50 steps) barely moves from its initial
output; we optimise ``w`` directly (projected Adam steps, or an exact per-row grid search).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flux_app.common.agglomerative import assign_newcomer, cluster_distances
from flux_app.common.statecodec import state_type
from flux_app.common.subspaces import ClassSubspaces, cross_class_angles, pairwise_class_angles
from flux_app.methods.feddag.sketch import angle_distance_matrix

__all__ = [
    "SIMILARITIES",
    "FeddagDistances",
    "FeddagScales",
    "WeightScale",
    "data_distance",
    "feddag_distances",
    "fuse",
    "fusion_weights",
    "gradient_distance",
    "minmax_offdiag",
    "newcomer_distances",
    "offdiag_range",
    "quantity_ratios",
    "quantity_weights",
    "row_entropy",
]

SIMILARITIES = ("fused", "data", "gradient")


def _offdiag(m: np.ndarray) -> np.ndarray:
    return m[~np.eye(m.shape[0], dtype=bool)]


def offdiag_range(m: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of the off-diagonal entries (``(0, 0)`` when ``n < 2``)."""
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError("expected a square matrix")
    if m.shape[0] < 2:
        return 0.0, 0.0
    off = _offdiag(m)
    return float(off.min()), float(off.max())


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(values - lo) / (hi - lo)``; all zeros when the range is empty."""
    values = np.asarray(values, dtype=np.float64)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def minmax_offdiag(m: np.ndarray) -> np.ndarray:
    """Scale a square matrix to ``[0, 1]`` using the off-diagonal entries only; diagonal 0.

    A matrix whose off-diagonal entries are all equal (or ``n < 2``) maps to all zeros: no pair
    is farther than another.
    """
    m = np.asarray(m, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        raise ValueError("matrix contains non-finite values")
    out = _scale(m, *offdiag_range(m))
    np.fill_diagonal(out, 0.0)
    return out


def gradient_distance(sketches: np.ndarray) -> np.ndarray:
    """``G``: pairwise angles (degrees) between gradient sketches, min-max scaled."""
    return minmax_offdiag(angle_distance_matrix(sketches))


def quantity_ratios(counts_a: np.ndarray, counts_b: np.ndarray) -> np.ndarray:
    """Raw imbalance ratios ``[na, nb, C]``: ``max(l_a, l_b) / min(l_a, l_b)``, ``l = ln(count + 1)``.

    Both absent (0/0) -> 1; one absent (x/0) -> ``inf`` (resolved by :func:`quantity_weights`).
    """
    la = np.log1p(np.asarray(counts_a, dtype=np.float64))
    lb = np.log1p(np.asarray(counts_b, dtype=np.float64))
    hi = np.maximum(la[:, None, :], lb[None, :, :])
    lo = np.minimum(la[:, None, :], lb[None, :, :])
    ratio = np.ones_like(hi)
    both = lo > 0
    ratio[both] = hi[both] / lo[both]
    ratio[(lo == 0) & (hi > 0)] = np.inf
    return ratio


@state_type
@dataclass(frozen=True)
class WeightScale:
    """How raw ratios became weights: ``fill`` for one-sided classes, then ``[rmin, rmax]`` ->
    ``[1 - delta, 1 + delta]``. Kept so that newcomers are weighted on the same scale."""

    fill: float
    rmin: float
    rmax: float
    delta: float

    def apply(self, ratio: np.ndarray) -> np.ndarray:
        """Weights for raw ratios (clipped into ``[1 - delta, 1 + delta]``)."""
        ratio = np.where(np.isinf(ratio), self.fill, ratio)
        if self.rmax - self.rmin <= 1e-12:
            return np.ones_like(ratio)
        scaled = (ratio - self.rmin) / (self.rmax - self.rmin)
        return (1.0 - self.delta) + 2.0 * self.delta * np.clip(scaled, 0.0, 1.0)


def _weight_scale(ratio: np.ndarray, delta: float) -> WeightScale:
    finite = ratio[np.isfinite(ratio)]
    fill = float(finite.max()) if finite.size else 1.0
    filled = np.where(np.isinf(ratio), fill, ratio)
    return WeightScale(fill=fill, rmin=float(filled.min()), rmax=float(filled.max()), delta=delta)


def quantity_weights(counts: np.ndarray, delta: float = 0.5) -> np.ndarray:
    """Per-pair, per-class quantity weights ``W`` ``[n, n, C]`` in ``[1 - delta, 1 + delta]``.

    ``ratio_ijc = max(l_ic, l_jc) / min(l_ic, l_jc)`` with ``l = ln(count + 1)``. Conventions:
    both absent (0/0) -> 1 (no imbalance); one absent (x/0) -> the largest finite ratio seen over
    all ``(i, j, c)`` (the most imbalanced case we can measure; at least 1). The ratios are then
    min-max rescaled over all ``(i, j, c)`` into ``[1 - delta, 1 + delta]``; when they are all
    equal every weight is 1.
    """
    return _quantity_weights(counts, delta)[0]


def _quantity_weights(counts: np.ndarray, delta: float) -> tuple[np.ndarray, WeightScale]:
    counts = np.asarray(counts)
    if counts.ndim != 2 or np.any(counts < 0):
        raise ValueError("counts must be a non-negative [n, C] array")
    if not 0.0 <= delta < 1.0:
        raise ValueError("delta must be in [0, 1)")
    ratio = quantity_ratios(counts, counts)
    scale = _weight_scale(ratio, delta)
    return scale.apply(ratio), scale


def _raw_data_distance(
    subspaces: Sequence[ClassSubspaces], delta: float, class_angles: np.ndarray | None
) -> tuple[np.ndarray, WeightScale]:
    if class_angles is None:
        class_angles = pairwise_class_angles(subspaces)
    counts = np.stack([s.counts for s in subspaces])
    weights, wscale = _quantity_weights(counts, delta)
    if class_angles.shape != weights.shape:
        raise ValueError(f"class_angles {class_angles.shape} != {weights.shape}")
    return (class_angles * weights).mean(axis=2), wscale


def data_distance(
    subspaces: Sequence[ClassSubspaces],
    delta: float = 0.5,
    *,
    class_angles: np.ndarray | None = None,
) -> np.ndarray:
    """``V``: quantity-weighted mean class angle, min-max scaled.

    ``V_ij = (1/C) sum_c angle_c(i, j) * W_ijc`` over ALL ``C`` classes, with the angles in
    degrees (0..90) before the off-diagonal min-max scaling.

    Parameters
    ----------
    subspaces : Sequence[ClassSubspaces]
        One per client (bases and counts).
    delta : float
        Half-width of the weight range (FedDAG: 0.5).
    class_angles : np.ndarray, optional
        Precomputed :func:`~flux_app.common.subspaces.pairwise_class_angles` ``[n, n, C]``.
    """
    return minmax_offdiag(_raw_data_distance(subspaces, delta, class_angles)[0])


def _entropy_rows(a: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    logits = -a / temperature
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    if mask is not None:
        # Zero the -inf log-probabilities BEFORE the product: 0 * -inf is NaN, also in backward.
        logp = logp.masked_fill(mask, 0.0)
    return -(p * logp).sum(dim=1)


def _prepare(g: np.ndarray, v: np.ndarray, mask_diagonal: bool | None):
    g = np.asarray(g, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if g.shape != v.shape or g.ndim != 2:
        raise ValueError(f"G {g.shape} and V {v.shape} must be equal 2-D shapes")
    if mask_diagonal is None:
        mask_diagonal = g.shape[0] == g.shape[1]
    mask = None
    if mask_diagonal:
        if g.shape[0] != g.shape[1]:
            raise ValueError("mask_diagonal needs square matrices")
        mask = torch.eye(g.shape[0], dtype=torch.bool)
    return torch.from_numpy(g), torch.from_numpy(v), mask


def row_entropy(
    g: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    *,
    temperature: float = 1.0,
    mask_diagonal: bool | None = None,
) -> np.ndarray:
    """Entropy of ``softmax_j(-A_ij / T)`` per row, ``A = w G + (1 - w) V`` (row-wise, unsymmetrised).

    ``mask_diagonal`` (default: when square) leaves ``j = i`` out of the softmax.
    """
    gt, vt, mask = _prepare(g, v, mask_diagonal)
    wt = torch.as_tensor(np.asarray(w, dtype=np.float64)).reshape(-1, 1)
    return _entropy_rows(wt * gt + (1 - wt) * vt, mask, temperature).numpy()


def fusion_weights(
    g: np.ndarray,
    v: np.ndarray,
    steps: int = 50,
    lr: float = 0.05,
    method: str = "pgd",
    *,
    temperature: float = 1.0,
    mask_diagonal: bool | None = None,
    grid_size: int = 101,
) -> np.ndarray:
    """Per-client fusion weights ``w`` in ``[0, 1]`` minimising the mean row entropy.

    Parameters
    ----------
    g, v : np.ndarray
        Gradient and data distances, ``[n, n]`` (or ``[m, n]`` rows of newcomers against the
        clustered clients, with ``mask_diagonal=False``).
    steps, lr : int, float
        ``"pgd"``: projected gradient descent from ``w = 0.5`` with Adam-scaled steps (each
        coordinate moves by about ``lr`` per step whatever the size of its gradient, which is
        ``O(1/n)`` for a mean over rows), clipped to ``[0, 1]`` after every step; torch autograd,
        float64 on CPU, hence deterministic.
    method : {"pgd", "grid"}
        ``"grid"``: exact per-row minimisation over ``grid_size`` evenly spaced ``w`` (rows are
        independent, so this is the global optimum on the grid; ties go to the ``w`` nearest 0.5).
    temperature : float
        Softmax temperature ``T`` (distances are in ``[0, 1]``).
    mask_diagonal : bool, optional
        Exclude ``j = i`` from each row's softmax; default: when the matrices are square.

    Returns
    -------
    np.ndarray
        float64 ``[n]`` in ``[0, 1]``. Rows with fewer than two candidates (``n <= 2``) have a
        constant entropy and keep ``w = 0.5``.
    """
    if method not in ("pgd", "grid"):
        raise ValueError(f"unknown fusion method {method!r}")
    gt, vt, mask = _prepare(g, v, mask_diagonal)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problem: thread hand-offs cost more than the maths
    try:
        if method == "grid":
            return _grid_weights(gt, vt, mask, temperature, grid_size)
        return _pgd_weights(gt, vt, mask, temperature, steps, lr)
    finally:
        torch.set_num_threads(threads)


def _grid_weights(gt, vt, mask, temperature: float, grid_size: int) -> np.ndarray:
    grid = torch.linspace(0.0, 1.0, grid_size, dtype=torch.float64)
    with torch.no_grad():
        ent = torch.stack(
            [_entropy_rows(w * gt + (1 - w) * vt, mask, temperature) for w in grid], dim=1
        )  # [n, grid]
    # Break ties (flat rows) toward the middle of the grid: no evidence, no preference.
    penalty = 1e-12 * (grid - 0.5).abs()
    return grid[torch.argmin(ent + penalty, dim=1)].numpy().copy()


def _pgd_weights(gt, vt, mask, temperature: float, steps: int, lr: float) -> np.ndarray:
    # Adam moments by hand (beta1 0.9, beta2 0.999): per-coordinate step sizes of about lr.
    n = gt.shape[0]
    w = torch.full((n, 1), 0.5, dtype=torch.float64)
    m1 = torch.zeros_like(w)
    m2 = torch.zeros_like(w)
    for t in range(1, steps + 1):
        w.requires_grad_(True)
        loss = _entropy_rows(w * gt + (1 - w) * vt, mask, temperature).mean()
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            m1 = 0.9 * m1 + 0.1 * grad
            m2 = 0.999 * m2 + 0.001 * grad * grad
            step = lr * (m1 / (1 - 0.9**t)) / ((m2 / (1 - 0.999**t)).sqrt() + 1e-8)
            w = (w.detach() - step).clamp(0.0, 1.0)  # projection onto [0, 1]
    return w.detach().reshape(-1).numpy().copy()


def fuse(g: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``A``: row-wise ``w_i G_ij + (1 - w_i) V_ij``, upper triangle mirrored, zero diagonal."""
    g = np.asarray(g, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64).reshape(-1, 1)
    if g.shape != v.shape or g.shape[0] != g.shape[1] or w.shape[0] != g.shape[0]:
        raise ValueError("G, V must be [n, n] and w [n]")
    a = np.triu(w * g + (1 - w) * v, k=1)
    return a + a.T


@state_type
@dataclass(frozen=True)
class FeddagScales:
    """The constants that put a newcomer's distances on the clustered population's scale."""

    g_range: tuple[float, float] | None  #: off-diagonal range of the raw sketch angles
    v_range: tuple[float, float] | None  #: off-diagonal range of the raw weighted class angles
    weights: WeightScale | None  #: quantity-weight scale


@state_type
@dataclass(frozen=True)
class FeddagDistances:
    """FedDAG distances of one population of clients."""

    a: np.ndarray  #: fused (or data-only / gradient-only) distance used for clustering
    g: np.ndarray | None  #: gradient distance (None for data-only)
    v: np.ndarray | None  #: data distance (None for gradient-only)
    w: np.ndarray  #: per-client weight on G (1 = gradient only, 0 = data only)
    scales: FeddagScales  #: for :func:`newcomer_distances`


def feddag_distances(
    subspaces: Sequence[ClassSubspaces] | None,
    sketches: np.ndarray | None,
    similarity: str = "fused",
    delta: float = 0.5,
    *,
    class_angles: np.ndarray | None = None,
    **fusion_kwargs,
) -> FeddagDistances:
    """Build the distance FedDAG clusters on.

    Parameters
    ----------
    subspaces : Sequence[ClassSubspaces] or None
        One per client (not needed for ``"gradient"``).
    sketches : np.ndarray or None
        ``[n, m]`` gradient sketches (not needed for ``"data"``).
    similarity : {"fused", "data", "gradient"}
        ``"data"`` and ``"gradient"`` are the paper's ablations (``w = 0`` and ``w = 1``).
    delta : float
        Quantity-weight half-width.
    class_angles : np.ndarray, optional
        Precomputed per-class angles ``[n, n, C]``.
    fusion_kwargs
        Passed to :func:`fusion_weights`.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}")
    g = v = None
    g_range = v_range = wscale = None
    if similarity in ("fused", "gradient"):
        raw_g = angle_distance_matrix(sketches)
        g_range = offdiag_range(raw_g)
        g = minmax_offdiag(raw_g)
    if similarity in ("fused", "data"):
        raw_v, wscale = _raw_data_distance(subspaces, delta, class_angles)
        v_range = offdiag_range(raw_v)
        v = minmax_offdiag(raw_v)
    scales = FeddagScales(g_range=g_range, v_range=v_range, weights=wscale)
    if v is None:
        w = np.ones(len(g))
        return FeddagDistances(a=fuse(g, g, w), g=g, v=None, w=w, scales=scales)
    if g is None:
        w = np.zeros(len(v))
        return FeddagDistances(a=fuse(v, v, w), g=None, v=v, w=w, scales=scales)
    w = fusion_weights(g, v, **fusion_kwargs)
    return FeddagDistances(a=fuse(g, v, w), g=g, v=v, w=w, scales=scales)


def newcomer_distances(
    scales: FeddagScales,
    *,
    new_subspaces: Sequence[ClassSubspaces] | None = None,
    new_sketches: np.ndarray | None = None,
    subspaces: Sequence[ClassSubspaces] | None = None,
    sketches: np.ndarray | None = None,
    **fusion_kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance rows of newcomers to the clustered clients, on the stored scale.

    Each newcomer fits only its own fusion weight on its own row (rows are independent), as in
    FedDAG. Rows are scaled with the clustered population's ranges and clipped to ``[0, 1]``.

    Parameters
    ----------
    scales : FeddagScales
        From the clustered population's :class:`FeddagDistances`.
    new_subspaces, new_sketches : optional
        The newcomers' descriptors (``m`` of them); the ones the similarity uses are required.
    subspaces, sketches : optional
        The clustered clients' descriptors (``n``).
    fusion_kwargs
        Passed to :func:`fusion_weights`.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``a_rows`` ``[m, n]`` (feed each to :func:`~flux_app.common.agglomerative.assign_newcomer`)
        and the newcomers' weights ``w`` ``[m]``.
    """
    g_rows = v_rows = None
    if scales.g_range is not None:
        if new_sketches is None or sketches is None:
            raise ValueError("gradient similarity needs both populations' sketches")
        new_sketches = np.atleast_2d(np.asarray(new_sketches, dtype=np.float64))
        both = np.concatenate([new_sketches, np.asarray(sketches, dtype=np.float64)])
        m = new_sketches.shape[0]
        raw = angle_distance_matrix(both)[:m, m:]
        g_rows = np.clip(_scale(raw, *scales.g_range), 0.0, 1.0)
    if scales.v_range is not None:
        if new_subspaces is None or subspaces is None or scales.weights is None:
            raise ValueError("data similarity needs both populations' subspaces")
        angles = cross_class_angles(list(new_subspaces), list(subspaces))
        ratio = quantity_ratios(
            np.stack([s.counts for s in new_subspaces]), np.stack([s.counts for s in subspaces])
        )
        raw = (angles * scales.weights.apply(ratio)).mean(axis=2)
        v_rows = np.clip(_scale(raw, *scales.v_range), 0.0, 1.0)
    if v_rows is None:
        return g_rows, np.ones(g_rows.shape[0])
    if g_rows is None:
        return v_rows, np.zeros(v_rows.shape[0])
    w = fusion_weights(g_rows, v_rows, mask_diagonal=False, **fusion_kwargs)
    return w[:, None] * g_rows + (1 - w[:, None]) * v_rows, w


def place_newcomers(
    rows: np.ndarray,
    labels: np.ndarray,
    newcomer_alpha: float,
    clusters: Sequence[int],
    linkage: str = "average",
    weights: np.ndarray | None = None,
) -> list[int]:
    """Cluster of each newcomer from its distance row to the clustered nodes.

    One pass of the sweep's linkage at the stored threshold
    (:func:`~flux_app.common.agglomerative.assign_newcomer`); a newcomer that would open a new
    cluster (it would have no trained model) goes to the existing cluster nearest by the same
    linkage distance.

    Parameters
    ----------
    rows : np.ndarray
        ``[m, n]`` newcomer-to-clustered-node distances (:func:`newcomer_distances`).
    labels : np.ndarray
        ``[n]`` clusters of the clustered nodes.
    newcomer_alpha : float
        The stored threshold (the sweep's ``newcomer_alpha``).
    clusters : Sequence[int]
        The clusters that have a model.
    linkage : {"average", "weighted"}
        ``feddag-linkage``: UPGMA (member mean) or WPGMA (tree weights).
    weights : np.ndarray, optional
        ``[n]`` :func:`~flux_app.common.agglomerative.linkage_weights`; required with
        ``"weighted"``.

    Returns
    -------
    list[int]
        The cluster of each newcomer.
    """
    out = []
    for row in rows:
        z = assign_newcomer(row, labels, newcomer_alpha, linkage, weights)
        if z not in clusters:
            ids, dist = cluster_distances(row, labels, linkage, weights)
            near = {int(k): float(v) for k, v in zip(ids, dist, strict=True)}
            z = min(clusters, key=lambda c: near.get(int(c), math.inf))
        out.append(int(z))
    return out
