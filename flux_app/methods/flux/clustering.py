r"""FLUX server side: descriptor embedding, distance, clustering without K, routing.

Pure numpy / scipy / scikit-learn / hdbscan; no Flower imports.

Embedding (Euclidean distance = FLUX distance)
    Every descriptor is mapped to one vector so that plain Euclidean distance between vectors *is*
    the FLUX distance. Neighbour search (trees, chunked brute force) then replaces any
    ``n x n`` matrix, which is what lets 100k clients cluster in seconds. Layout::

        [ mu/s_mu (K) | sigma/s_sig (K) | class_mu/s_cmu (C*K) | class_sigma/s_csig (C*K) |
          sqrt(missing_penalty) * present (C) ]

    Un-normalised (all scales 1), for two clients that both have every class, the squared distance
    is ``sum over {marginal, each class} of ||m1 - m2||^2 + ||s1 - s2||^2``, i.e. the sum of the
    squared 2-Wasserstein distances between the diagonal Gaussians
    ``W2^2(N(m1, diag s1^2), N(m2, diag s2^2)) = ||m1 - m2||^2 + ||s1 - s2||^2``.
    The first ``2K`` coordinates are the *label-free* embedding (used for routing).

Missing classes
    A class is *unobserved* at a client when ``n_c < 2``: its class block is imputed with the
    federation mean of that class's statistics (over the fitted clients that have it). It is
    *absent* when, in addition, so few samples are significant against the client's own sample
    size: ``P(Binomial(n, p_c) <= 1) < ABSENCE_ALPHA / C`` with ``p_c`` the class's share of all
    fitted clients' samples (the null "this client draws classes as the federation does"). A
    presence coordinate ``sqrt(missing_penalty) * 1[not absent]`` is appended per class. Hence,
    per class (``present`` = not absent):

    * both present: the (normalised) W2^2 between the two class Gaussians;
    * both absent: 0 (identical imputed blocks and indicators);
    * exactly one present: ``missing_penalty + ||present client's class block - class mean||^2``.

    The extra deviation term (instead of a pure constant) is the price of staying Euclidean: a
    constant for "one present" cannot be written as a distance between fixed per-client vectors,
    and imputing the class mean makes the extra term as small as possible (the mean minimises the
    expected squared deviation). Label shift (different present masks) therefore shows up as at
    least ``missing_penalty`` per differing class.

    Why "significant": a client of 48 samples and 10 classes misses some class by chance 36 % of
    the time (FMNIST px level 2, 1,000 clients); with every ``n_c < 2`` counted as absent,
    HDBSCAN grouped such clients by *which* class they missed (micro-clusters of 8-18 clients of
    one group, all missing the same class) and the IID guard could not merge them back: the
    indicator has no sampling variance in its null model, and the clustering had selected the
    clients by it. 40 clusters for 3 groups (ARI 0.49); counting only significant absences,
    3 clusters (ARI 1.0). Large clients are unaffected: at ``n = 96`` and ``p_c = 0.1`` one
    sample or none has probability 4.7e-4 < 0.01 / 10, so every structural absence of a label
    shift with more than ~100 samples a client still counts.

Normalisation (:class:`BlockNormaliser`)
    Fitted on the training clients' descriptors, then applied unchanged to newcomers. Each of the
    four blocks (marginal mu, marginal sigma, class mu, class sigma) is divided by one scalar
    (so within a block the W2 geometry is kept) and nothing is subtracted:

    ``scale_b = max(spread_b, noise_floor * noise_b)``, falling back to 1.0 when ~0, where

    * ``spread_b`` = median over clients of the L2 distance of the client's block to the block's
      coordinatewise median (robust: a few outlying clients do not set the scale, unlike the
      reference's min-max scaling). For the class blocks the spread is computed per class over the
      clients that have it, ``d_c``, and combined as ``sqrt(sum_c d_c^2)`` (equal to the whole-block
      spread when every client has every class, and unaffected by imputation).
    * ``noise_b`` = median over clients of the expected sampling-noise radius of the block,
      ``sqrt(sum_k Var(stat_k))`` (see below); ``noise_floor`` defaults to 3.

    Why the floor (our addition): pure robust scaling stretches a block that carries *no* signal
    (e.g. class-conditional moments under pure label shift, where ``P(X|Y)`` is shared) until its
    sampling noise is as loud as the informative blocks. With the floor, a noise-only block weighs
    ``~1/noise_floor^2`` of a block whose spread is real structure; blocks whose spread exceeds
    ``noise_floor`` times their noise are scaled exactly as specified above.

Clustering (:func:`cluster_descriptors`), no K given
    * ``"hdbscan"`` (default): ``hdbscan.HDBSCAN(min_cluster_size=max(2, min_cluster_size),
      min_samples=1, allow_single_cluster=not iid_guard)`` on the embedding (exact Prim MST,
      excess-of-mass selection). With
      ``min_samples=1`` the core distance is 0 and the mutual-reachability distance is the plain
      Euclidean distance (the hierarchy is single linkage), so groups as small as
      ``min_cluster_size`` clients (a federation of 10-20 clients) are not swallowed as noise.
      With the IID guard on, the "one cluster" decision is left to the guard: on synthetic
      federations with weak groups, ``allow_single_cluster=True`` made HDBSCAN keep the root
      (mean ARI 0.38 vs 0.96 at a small shift) while the guard alone kept every IID federation
      whole. Without the guard, ``allow_single_cluster=True`` lets HDBSCAN return one cluster.
    * ``"knee-dbscan"`` (the reference): ``eps`` = knee of the sorted 1-NN distance curve as the
      reference finds it with ``kneed.KneeLocator(curve="convex", direction="increasing", S=1)``:
      Kneedle's FIRST confirmed knee, walking from the largest distances down (a local maximum
      of the gap below the chord, both axes in [0, 1], after which the gap falls by more than
      ``S / (m - 1)`` before the next local maximum; :func:`knee_point` with ``rule="first"``,
      kneed >= 0.8.6 semantics after a local minimum, ``after_minimum="reset"`` for older
      kneed). It can differ from the point of maximum gap, the rule used before (still
      ``rule="max"``). Then connected components of the eps-graph with ``min_samples=2``
      (sklearn DBSCAN, sparse neighbourhoods; a neighbour at exactly ``eps`` counts, as
      sklearn's ``<= eps`` says). No knee (fewer than 3 clients, a flat curve, or no local
      maximum confirmed): ``eps`` = the largest 1-NN distance (every client joins its nearest
      neighbour; the components are single-linkage groups), with a note; the reference has no
      fallback there (``DBSCAN(eps=None)`` fails).
    * Noise points (label -1): ``noise_policy="singleton"`` gives each its own cluster (the
      reference). ``"attach"`` (default) joins the nearest cluster centroid when the distance is
      ``<= attach_tolerance * max(r_p, r_global)``, with ``r_p`` the cluster's median
      member-to-centroid distance and ``r_global`` the median over all clustered clients (used
      when the cluster is tighter than typical); otherwise it becomes a singleton. All clients
      noise: one cluster, with a note.

IID guard ("no structure -> one cluster")
    A descriptor's own sampling noise is known: ``Var(mu_k) = sigma_k^2/n`` and
    ``Var(sigma_k) = sigma_k^2 / (2(n-1))`` (Gaussian features; per class with ``n_c``), divided by
    the block scale squared in the normalised embedding (imputed coordinates and indicators have
    zero variance). For clusters ``p, q`` with centroids ``c_p, c_q`` the null "same distribution"
    gives ``E||c_p - c_q||^2 = sum_j Var(c_pj) + Var(c_qj)`` with ``Var(c_pj) = sum_{i in p}
    v_ij / |p|^2``. The statistic ``T_pq = ||c_p - c_q||^2 / (lambda E_pq)`` is compared with

    ``tau_pq = max(guard_ratio, chi2_{1 - alpha/#pairs}(nu) / nu)``

    with ``guard_ratio = 4``, ``alpha = 0.01``, ``nu = min(nu_p, nu_q)`` the Satterthwaite effective
    degrees of freedom (a valid lower bound for the pair, so the chi-square quantile is
    conservative). Non-significant pairs (``T < tau``) are merged (mutual best pairs first,
    repeatedly) until every remaining pair is significant; if everything merges the result is one
    cluster with the note "no structure beyond sampling noise".

    Why 4: under the null ``T`` concentrates at 1 with relative sd ``sqrt(2/nu)`` (0.1 for
    ``K = C = 10``, ``nu ~ 200``). Clustering *selects* the split, which inflates ``T``: the best
    balanced split of ``m`` pure-noise points in ``nu`` dimensions reaches about
    ``(1 + sqrt(m/nu))^2`` (top eigenvalue of a Wishart matrix), below 4 while ``m <= nu``; and the
    Gaussian ``Var(sigma)`` formula is off by ``(kappa - 1)/2`` for features of kurtosis
    ``kappa``. The price in power is small for shifts that matter: ``T`` grows with the squared
    shift times the sample count, e.g. on synthetic groups of 5 clients (n = 100-2000, feature
    std 0.5-1.5) a random group shift of sd 0.1 per coordinate gives ``T`` = 2-17 (median 5: not
    reliably detected) and sd 0.5 gives ``T`` = 10-63 (median 24). The chi-square term takes over when ``nu`` is small (label-free or tiny
    ``K``), where single extreme points can exceed 4 by chance. The threshold was chosen from
    these synthetic arguments only, not tuned on benchmark results.

    Noisy members (a crafted descriptor's lever): the variance of an unweighted centroid is
    dominated by its noisiest member, so one client claiming a tiny ``n`` (or a huge ``sigma``)
    could make two well-separated groups look alike and have them merged. The guard's
    centroids therefore weight each client ``w_i = min(1, NOISE_WEIGHT_CAP * median_j V_j / V_i)``
    (``V_i`` = its total sampling variance), with ``c_p = sum w_i x_i / sum w_i`` and
    ``Var(c_pj) = sum w_i^2 v_ij / (sum w_i)^2``: exactly the unweighted statistic while every
    client's noise is within ``NOISE_WEIGHT_CAP`` (20) times the median's, and a client beyond it
    adds at most what a client at that bound would add, wherever it sits.

    ``lambda`` (noise inflation) is estimated from the data: the median over clients in clusters of
    size >= 2 of ``||x_i - c_p||^2 / E||x_i - c_p||^2`` (divided by the chi-square median so it is
    1 under the model), clipped to ``[1, 10]``. It absorbs heavier-than-Gaussian tails, duplicated
    samples (resampling with replacement) and DP noise, which all make descriptors noisier than the
    formula says; the median keeps a minority of mixed clusters from inflating it. (Synthetic
    check: IID clients with squared-ReLU latents give ``lambda ~ 3``; with ``lambda`` fixed at 1,
    18 of 20 such federations were split, with it none.) Known cost: if density clustering lumps
    most clients of *different* groups into one cluster, ``lambda`` grows and weak groups can be
    merged away.

Small groups (measured noise)
    The inflation ``lambda`` estimated from within-cluster residuals assumes the density
    clustering's clusters are pure; where groups have one or two clients (FLUX protocol, level 8:
    10 clients in 5-10 groups) HDBSCAN must lump distinct clients, ``lambda`` hits its cap and the
    guard merges real groups (py level 8: ``lambda`` 4.6-5.1, ARI 0.76; px level 8: 10.0). The
    FLUX strategy therefore also asks every training client for the descriptor of its
    validation split (``noise_check``: a second, disjoint sample of the same distribution).
    ``e_train - e_val`` is pure sampling noise, so ``lambda`` is measured on those pairs
    (:func:`measured_inflation`: median ratio of ``||e_train - e_val||^2`` to its model
    expectation over the coordinates both observe), with no clustering involved. With a measured
    ``lambda`` the noise model, not a distance tolerance, decides every grouping:

    * noise points of the density clustering become singletons (the guard merges them where the
      difference is not significant);
    * a cluster with a member significantly unlike the centroid of the others (the guard's test
      and threshold, Bonferroni over the clients) is returned to its members;
    * the guard then merges every pair that is not significantly different, as above.

    So a client significantly unlike every other stays alone (Local), two significantly
    different one-client groups are never merged, and an IID federation still merges into one
    cluster (its pairs are not significant). Without validation descriptors (``val-fraction``
    0) the residual estimate is used, as before.

Scale
    For ``n > max_dense`` clients, clustering (and the guard) run on a seeded random subset of
    ``max_dense`` clients; the rest are assigned to the nearest centroid with
    ``NearestNeighbors`` in chunks, and centroids are recomputed over all members. Normaliser,
    embedding and centroids are ``O(n d)``; no ``n x n`` matrix is ever built (the guard works on
    at most ``max_dense`` clusters, chunked).

Routing
    A newcomer's label-free descriptor is embedded with the *same* fitted scales and sent to the
    cluster whose label-free centroid (mean of the members' label-free embeddings) is nearest.
"""

from __future__ import annotations

# scipy and scikit-learn are imported inside the functions that use them: server-only work, kept off
# the ClientApp's import path (a deployment message starts a fresh process).
import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flux_app.common.statecodec import state_type
from flux_app.methods.flux.descriptors import FluxDescriptor

__all__ = [
    "preload_libraries",
    "ABSENCE_ALPHA",
    "GUARD_ALPHA",
    "GUARD_RATIO",
    "BlockNormaliser",
    "FluxClustering",
    "ari_nmi",
    "absent_classes",
    "assign_to_centroids",
    "cluster_descriptors",
    "descriptor_distance",
    "embed",
    "knee_point",
    "label_free_embed",
    "measured_inflation",
    "pair_ratios",
    "route",
    "route_many",
]

#: Default IID-guard threshold on ``T = ||c_p - c_q||^2 / E_null`` (see module docstring).
GUARD_RATIO = 4.0
#: Family-wise level of the chi-square part of the guard threshold (Bonferroni over pairs).
GUARD_ALPHA = 0.01
#: Minimum gap below the chord (both axes in [0, 1]) for a 1-NN curve to have a knee.
KNEE_MIN_GAP = 0.05
#: Per-client level of the test that a class with fewer than 2 samples is really absent (split
#: over the classes; module docstring, "Missing classes").
ABSENCE_ALPHA = 0.01
#: Cap of the estimated noise inflation of the IID guard.
MAX_INFLATION = 10.0
#: A client whose own descriptor noise (the sum of its embedding's sampling variances) exceeds
#: this many times the median client's enters the IID guard's cluster centroids with weight
#: ``NOISE_WEIGHT_CAP * median / its noise`` instead of 1 (see :func:`_guard_weights`).
NOISE_WEIGHT_CAP = 20.0
_TINY = 1e-12


# --------------------------------------------------------------------------------------------
# Stacking descriptors
# --------------------------------------------------------------------------------------------
@dataclass
class _Stack:
    """Descriptors as arrays: mu/sigma [n, K], n [n]; class parts [n, C, K], counts [n, C]."""

    mu: np.ndarray
    sigma: np.ndarray
    n: np.ndarray
    class_mu: np.ndarray | None = None
    class_sigma: np.ndarray | None = None
    counts: np.ndarray | None = None

    @property
    def label_free(self) -> bool:
        return self.counts is None

    @property
    def present(self) -> np.ndarray:
        return self.counts >= 2

    def take(self, idx: np.ndarray) -> _Stack:
        if self.label_free:
            return _Stack(self.mu[idx], self.sigma[idx], self.n[idx])
        return _Stack(
            self.mu[idx],
            self.sigma[idx],
            self.n[idx],
            self.class_mu[idx],
            self.class_sigma[idx],
            self.counts[idx],
        )


def _stack(descriptors: Sequence[FluxDescriptor], label_free: bool | None = None) -> _Stack:
    """Stack descriptors; ``label_free=None`` infers it (all label-free or none)."""
    if len(descriptors) == 0:
        raise ValueError("no descriptors")
    dim = descriptors[0].dim
    flags = {d.is_label_free for d in descriptors}
    if label_free is None:
        if len(flags) > 1:
            raise ValueError("mix of label-free and full descriptors; pass only one kind")
        label_free = flags.pop()
    elif not label_free and True in flags:
        raise ValueError("a full (labelled) descriptor is required here, got a label-free one")
    if any(d.dim != dim for d in descriptors):
        raise ValueError("descriptors have different projection dimensions")
    mu = np.stack([d.mu for d in descriptors])
    sigma = np.stack([d.sigma for d in descriptors])
    n = np.array([d.n for d in descriptors], dtype=np.float64)
    if label_free:
        return _Stack(mu, sigma, n)
    c = descriptors[0].num_classes
    if any(d.num_classes != c for d in descriptors):
        raise ValueError("descriptors have different numbers of classes")
    return _Stack(
        mu,
        sigma,
        n,
        np.stack([d.class_mu for d in descriptors]),
        np.stack([d.class_sigma for d in descriptors]),
        np.stack([d.class_counts for d in descriptors]),
    )


def _mu_var(sigma: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Sampling variance of a mean: sigma^2 / n (n broadcast over the last axis)."""
    return sigma**2 / np.maximum(n, 1.0)[..., None]


def _sigma_var(sigma: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Sampling variance of a Gaussian standard deviation: sigma^2 / (2 (n - 1))."""
    return sigma**2 / (2.0 * np.maximum(n - 1.0, 1.0))[..., None]


def absent_classes(
    counts: np.ndarray, n: np.ndarray, share: np.ndarray | None, alpha: float | None = None
) -> np.ndarray:
    """Which classes each client significantly lacks (module docstring, "Missing classes").

    Parameters
    ----------
    counts : np.ndarray
        ``[m, C]`` class counts.
    n : np.ndarray
        ``[m]`` the clients' sample counts.
    share : np.ndarray or None
        ``[C]`` the federation's class shares; None counts every ``n_c < 2`` as absent.
    alpha : float, optional
        Per-client level, split over the classes (default :data:`ABSENCE_ALPHA`).

    Returns
    -------
    np.ndarray
        ``[m, C]`` bool: ``n_c < 2`` and ``P(Binomial(n, share_c) <= 1) < alpha / C``.
    """
    unobserved = np.asarray(counts) < 2
    if share is None:
        return unobserved
    alpha = ABSENCE_ALPHA if alpha is None else alpha
    p = np.clip(np.asarray(share, dtype=np.float64), 0.0, 1.0)[None, :]
    nn = np.maximum(np.asarray(n, dtype=np.float64), 1.0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.log1p(-np.minimum(p, 1.0 - 1e-300))  # log(1 - p)
        # P(X <= 1) = (1 - p)^n + n p (1 - p)^(n - 1)
        p_le1 = np.exp(nn * log_q) + nn * p * np.exp((nn - 1.0) * log_q)
    p_le1 = np.where(p >= 1.0, 0.0, np.where(p <= 0.0, 1.0, p_le1))
    return unobserved & (p_le1 < alpha / max(1, counts.shape[1]))


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
def _robust_spread(x: np.ndarray) -> float:
    """Median over rows of the L2 distance to the coordinatewise median (0 for < 1 row)."""
    if x.shape[0] == 0:
        return 0.0
    med = np.median(x, axis=0)
    return float(np.median(np.linalg.norm(x - med, axis=1)))


def _finalise_scale(spread: float, noise: float, noise_floor: float, magnitude: float) -> float:
    s = max(spread, noise_floor * noise)
    # ~0 (e.g. all clients identical and noiseless): keep raw units instead of dividing by ~0.
    if s <= 1e-9 * max(1.0, magnitude):
        return 1.0
    return float(s)


@state_type
@dataclass
class BlockNormaliser:
    """Per-block scales and class means for imputation, fitted once on the training clients.

    Attributes
    ----------
    dim, num_classes : int
        ``K`` and ``C`` (``num_classes = 0`` when fitted on label-free descriptors).
    scale_mu, scale_sigma, scale_class_mu, scale_class_sigma : float
        The divisor of each block (1.0 = raw units).
    class_mu_mean, class_sigma_mean : np.ndarray or None
        ``[C, K]`` raw-unit means of each class's statistics over the clients that have the class
        (zeros for a class nobody has); imputed for absent classes.
    class_seen : np.ndarray or None
        ``[C]`` bool, whether any fitted client had the class.
    class_share : np.ndarray or None
        ``[C]`` each class's share of all fitted clients' samples, the null of the absence test
        (None: every unobserved class counts as absent, as normalisers saved before it did).
    noise_floor : float
        The ``noise_floor`` used in the fit (see module docstring).
    """

    dim: int
    num_classes: int
    scale_mu: float = 1.0
    scale_sigma: float = 1.0
    scale_class_mu: float = 1.0
    scale_class_sigma: float = 1.0
    class_mu_mean: np.ndarray | None = None
    class_sigma_mean: np.ndarray | None = None
    class_seen: np.ndarray | None = None
    noise_floor: float = 3.0
    class_share: np.ndarray | None = None

    @property
    def label_free(self) -> bool:
        """True when fitted on label-free descriptors (no class blocks)."""
        return self.num_classes == 0

    @property
    def scales(self) -> dict[str, float]:
        """The four block scales by name."""
        return {
            "mu": self.scale_mu,
            "sigma": self.scale_sigma,
            "class_mu": self.scale_class_mu,
            "class_sigma": self.scale_class_sigma,
        }

    @classmethod
    def fit(
        cls,
        descriptors: Sequence[FluxDescriptor],
        scale: bool = True,
        noise_floor: float = 3.0,
    ) -> BlockNormaliser:
        """Fit on descriptors (all full, or all label-free).

        Parameters
        ----------
        descriptors : sequence of FluxDescriptor
        scale : bool
            False keeps raw units (all scales 1) and only fits the imputation means.
        noise_floor : float
            Multiple of the block's sampling-noise radius below which the scale does not go
            (0 = pure robust spread).
        """
        return cls._fit_stack(_stack(descriptors), scale=scale, noise_floor=noise_floor)

    @classmethod
    def _fit_stack(
        cls, st: _Stack, scale: bool = True, noise_floor: float = 3.0
    ) -> BlockNormaliser:
        k = st.mu.shape[1]
        out = cls(
            dim=k, num_classes=0 if st.label_free else st.counts.shape[1], noise_floor=noise_floor
        )
        if scale:
            noise_mu = float(np.median(np.sqrt(_mu_var(st.sigma, st.n).sum(axis=1))))
            noise_sig = float(np.median(np.sqrt(_sigma_var(st.sigma, st.n).sum(axis=1))))
            mag_mu = float(np.median(np.linalg.norm(st.mu, axis=1)))
            mag_sig = float(np.median(np.linalg.norm(st.sigma, axis=1)))
            out.scale_mu = _finalise_scale(_robust_spread(st.mu), noise_mu, noise_floor, mag_mu)
            out.scale_sigma = _finalise_scale(
                _robust_spread(st.sigma), noise_sig, noise_floor, mag_sig
            )
        if st.label_free:
            return out
        c = st.counts.shape[1]
        present = st.present
        out.class_seen = present.any(axis=0)
        total = float(st.counts.sum())
        out.class_share = st.counts.sum(axis=0) / total if total > 0 else np.zeros(c)
        out.class_mu_mean = np.zeros((c, k))
        out.class_sigma_mean = np.zeros((c, k))
        spread_mu = np.zeros(c)
        spread_sig = np.zeros(c)
        noise_mu = np.zeros(c)
        noise_sig = np.zeros(c)
        mag_mu = mag_sig = 0.0
        for ci in range(c):
            rows = present[:, ci]
            if not rows.any():
                continue
            cm = st.class_mu[rows, ci]
            cs = st.class_sigma[rows, ci]
            nc = st.counts[rows, ci].astype(np.float64)
            out.class_mu_mean[ci] = cm.mean(axis=0)
            out.class_sigma_mean[ci] = cs.mean(axis=0)
            if scale:
                spread_mu[ci] = _robust_spread(cm)
                spread_sig[ci] = _robust_spread(cs)
                noise_mu[ci] = np.median(np.sqrt(_mu_var(cs, nc).sum(axis=1)))
                noise_sig[ci] = np.median(np.sqrt(_sigma_var(cs, nc).sum(axis=1)))
                mag_mu = max(mag_mu, float(np.median(np.linalg.norm(cm, axis=1))))
                mag_sig = max(mag_sig, float(np.median(np.linalg.norm(cs, axis=1))))
        if scale:
            rss = lambda v: float(np.sqrt(np.sum(v**2)))  # noqa: E731 - combine per-class radii
            out.scale_class_mu = _finalise_scale(rss(spread_mu), rss(noise_mu), noise_floor, mag_mu)
            out.scale_class_sigma = _finalise_scale(
                rss(spread_sig), rss(noise_sig), noise_floor, mag_sig
            )
        return out

    def to_dict(self) -> dict:
        """JSON-serialisable state (for checkpoints / results)."""
        d = {
            "dim": self.dim,
            "num_classes": self.num_classes,
            "noise_floor": self.noise_floor,
            **{f"scale_{k}": v for k, v in self.scales.items()},
        }
        if not self.label_free:
            d["class_mu_mean"] = self.class_mu_mean.tolist()
            d["class_sigma_mean"] = self.class_sigma_mean.tolist()
            d["class_seen"] = self.class_seen.tolist()
            if self.class_share is not None:
                d["class_share"] = self.class_share.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BlockNormaliser:
        """Inverse of :meth:`to_dict`."""
        out = cls(
            dim=int(d["dim"]),
            num_classes=int(d["num_classes"]),
            scale_mu=float(d["scale_mu"]),
            scale_sigma=float(d["scale_sigma"]),
            scale_class_mu=float(d["scale_class_mu"]),
            scale_class_sigma=float(d["scale_class_sigma"]),
            noise_floor=float(d.get("noise_floor", 3.0)),
        )
        if out.num_classes:
            out.class_mu_mean = np.asarray(d["class_mu_mean"], dtype=np.float64)
            out.class_sigma_mean = np.asarray(d["class_sigma_mean"], dtype=np.float64)
            out.class_seen = np.asarray(d["class_seen"], dtype=bool)
            if d.get("class_share") is not None:
                out.class_share = np.asarray(d["class_share"], dtype=np.float64)
        return out


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------
def _check_compatible(st: _Stack, nz: BlockNormaliser, label_free: bool) -> None:
    if st.mu.shape[1] != nz.dim:
        raise ValueError(f"descriptor dim {st.mu.shape[1]} != normaliser dim {nz.dim}")
    if not label_free:
        if nz.label_free:
            raise ValueError("normaliser was fitted on label-free descriptors; no class blocks")
        if st.counts.shape[1] != nz.num_classes:
            raise ValueError(
                f"descriptors have {st.counts.shape[1]} classes, normaliser {nz.num_classes}"
            )


def _embed_stack(st: _Stack, nz: BlockNormaliser, missing_penalty: float) -> np.ndarray:
    """Full embedding (label-free stacks get the label-free embedding)."""
    lf = np.concatenate([st.mu / nz.scale_mu, st.sigma / nz.scale_sigma], axis=1)
    if st.label_free:
        return lf
    _check_compatible(st, nz, label_free=False)
    p3 = st.present[:, :, None]
    cmu = np.where(p3, st.class_mu, nz.class_mu_mean[None]) / nz.scale_class_mu
    csig = np.where(p3, st.class_sigma, nz.class_sigma_mean[None]) / nz.scale_class_sigma
    m = st.mu.shape[0]
    ind = math.sqrt(missing_penalty) * (~absent_classes(st.counts, st.n, nz.class_share))
    return np.concatenate([lf, cmu.reshape(m, -1), csig.reshape(m, -1), ind], axis=1)


def _noise_var_stack(st: _Stack, nz: BlockNormaliser) -> np.ndarray:
    """Per-coordinate sampling variance of the embedding (same layout as ``_embed_stack``)."""
    v = [_mu_var(st.sigma, st.n) / nz.scale_mu**2, _sigma_var(st.sigma, st.n) / nz.scale_sigma**2]
    if not st.label_free:
        present = st.present
        counts = st.counts.astype(np.float64)
        vm = np.where(present[:, :, None], _mu_var(st.class_sigma, counts), 0.0)
        vs = np.where(present[:, :, None], _sigma_var(st.class_sigma, counts), 0.0)
        m = st.mu.shape[0]
        v += [
            vm.reshape(m, -1) / nz.scale_class_mu**2,
            vs.reshape(m, -1) / nz.scale_class_sigma**2,
            np.zeros((m, counts.shape[1])),
        ]
    return np.concatenate(v, axis=1)


def embed(
    descriptors: Sequence[FluxDescriptor],
    normaliser: BlockNormaliser | None = None,
    missing_penalty: float = 1.0,
) -> np.ndarray:
    """Full embedding ``[n, 2K + 2CK + C]`` (see module docstring for the layout).

    Parameters
    ----------
    descriptors : sequence of FluxDescriptor
        Full descriptors (with class statistics).
    normaliser : BlockNormaliser, optional
        Fitted scales and imputation means. ``None``: raw units (scales 1) with imputation means
        fitted on ``descriptors`` themselves.
    missing_penalty : float
        Squared-distance cost of a class present at exactly one of two clients.
    """
    if missing_penalty < 0:
        raise ValueError("missing_penalty must be >= 0")
    st = _stack(descriptors, label_free=False)
    nz = normaliser if normaliser is not None else BlockNormaliser._fit_stack(st, scale=False)
    return _embed_stack(st, nz, missing_penalty)


def label_free_embed(
    descriptors: Sequence[FluxDescriptor],
    normaliser: BlockNormaliser | None = None,
) -> np.ndarray:
    """Label-free embedding ``[n, 2K]`` = ``[mu/s_mu, sigma/s_sig]`` (full descriptors accepted).

    ``normaliser=None`` means raw units. With a normaliser this equals the first ``2K`` columns of
    :func:`embed`.
    """
    if len(descriptors) == 0:
        raise ValueError("no descriptors")
    dim = descriptors[0].dim
    if any(d.dim != dim for d in descriptors):
        raise ValueError("descriptors have different projection dimensions")
    mu = np.stack([d.mu for d in descriptors])
    sigma = np.stack([d.sigma for d in descriptors])
    if normaliser is None:
        return np.concatenate([mu, sigma], axis=1)
    if dim != normaliser.dim:
        raise ValueError(f"descriptor dim {dim} != normaliser dim {normaliser.dim}")
    return np.concatenate([mu / normaliser.scale_mu, sigma / normaliser.scale_sigma], axis=1)


def descriptor_distance(
    a: FluxDescriptor,
    b: FluxDescriptor,
    normaliser: BlockNormaliser | None = None,
    missing_penalty: float = 1.0,
) -> float:
    """FLUX distance between two descriptors, computed pairwise (for small cases and tests).

    Equals the Euclidean distance between their :func:`embed` vectors (same normaliser; with
    ``normaliser=None`` raw units and imputation means fitted on ``{a, b}``, so a class present
    at exactly one of them costs exactly ``missing_penalty``). If either descriptor is label-free
    only the marginal (label-free) part is compared.
    """
    if a.dim != b.dim:
        raise ValueError("descriptors have different projection dimensions")
    if normaliser is None:
        if a.is_label_free or b.is_label_free:
            normaliser = BlockNormaliser(dim=a.dim, num_classes=0)
        else:
            normaliser = BlockNormaliser.fit([a, b], scale=False)
    nz = normaliser
    d2 = float(np.sum((a.mu - b.mu) ** 2)) / nz.scale_mu**2
    d2 += float(np.sum((a.sigma - b.sigma) ** 2)) / nz.scale_sigma**2
    if a.is_label_free or b.is_label_free:
        return math.sqrt(d2)
    if a.num_classes != b.num_classes or nz.num_classes != a.num_classes:
        raise ValueError("descriptors / normaliser disagree on the number of classes")
    sm2, ss2 = nz.scale_class_mu**2, nz.scale_class_sigma**2
    pa, pb = a.present, b.present  # observed (n_c >= 2): real moments, else imputed
    counts = np.stack([a.class_counts, b.class_counts])
    absent = absent_classes(counts, np.array([a.n, b.n]), nz.class_share)
    for c in range(a.num_classes):
        if pa[c] and pb[c]:
            d2 += float(np.sum((a.class_mu[c] - b.class_mu[c]) ** 2)) / sm2
            d2 += float(np.sum((a.class_sigma[c] - b.class_sigma[c]) ** 2)) / ss2
        elif pa[c] or pb[c]:
            x = a if pa[c] else b
            d2 += float(np.sum((x.class_mu[c] - nz.class_mu_mean[c]) ** 2)) / sm2
            d2 += float(np.sum((x.class_sigma[c] - nz.class_sigma_mean[c]) ** 2)) / ss2
        if absent[0, c] != absent[1, c]:
            d2 += missing_penalty
    return math.sqrt(d2)


# --------------------------------------------------------------------------------------------
# Helpers: centroids, nearest centroid, knee
# --------------------------------------------------------------------------------------------
def _relabel(labels: np.ndarray) -> np.ndarray:
    """Map labels to 0..Z-1 in order of first appearance (stable, deterministic)."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.shape[0], dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.shape[0])
    return rank[inv.reshape(-1)]


def _cluster_sums(x: np.ndarray, labels: np.ndarray, z: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and sizes via a sparse indicator matrix (O(n d))."""
    n = x.shape[0]
    from scipy import sparse

    ind = sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(z, n))
    sums = np.asarray(ind @ x)
    sizes = np.bincount(labels, minlength=z).astype(np.float64)
    return sums, sizes


def _centroids(x: np.ndarray, labels: np.ndarray, z: int) -> np.ndarray:
    sums, sizes = _cluster_sums(x, labels, z)
    return sums / np.maximum(sizes, 1.0)[:, None]


def assign_to_centroids(
    x: np.ndarray, centroids: np.ndarray, chunk_size: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of ``x`` (Euclidean), queried in chunks.

    Returns
    -------
    labels : np.ndarray
        ``[n]`` int64 index of the nearest centroid (lowest index on ties).
    distances : np.ndarray
        ``[n]`` distance to it.
    """
    x = np.asarray(x, dtype=np.float64)
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=1).fit(np.asarray(centroids, dtype=np.float64))
    labels = np.empty(x.shape[0], dtype=np.int64)
    dist = np.empty(x.shape[0])
    for s in range(0, x.shape[0], chunk_size):
        d, i = nn.kneighbors(x[s : s + chunk_size])
        labels[s : s + chunk_size] = i[:, 0]
        dist[s : s + chunk_size] = d[:, 0]
    return labels, dist


def knee_point(
    values: np.ndarray,
    min_gap: float = KNEE_MIN_GAP,
    *,
    rule: str = "max",
    sensitivity: float = 1.0,
    after_minimum: str = "wait",
) -> int | None:
    """Index of the knee of an increasing curve (``values`` are sorted ascending first).

    Both axes are rescaled to [0, 1] (x = the rank ``0..m-1``); the difference curve is
    ``gap_k = k / (m - 1) - y_k``, how far the curve lies below the chord from its first to its
    last point.

    Parameters
    ----------
    values : np.ndarray
        ``[m]`` the curve's values (knee-DBSCAN: the clients' 1-NN distances).
    min_gap : float
        ``rule="max"`` only: no knee when the largest gap is below it (near-linear or concave
        curve). The Kneedle rule has no such floor: ``sensitivity`` alone decides.
    rule : {"max", "first"}
        ``"max"`` (this function's default, kept for its callers): the point of the largest gap.
        ``"first"`` (what knee-DBSCAN uses by default): Kneedle's first confirmed knee (Satopaa
        et al. 2011) as the ``kneed`` package computes it offline (``KneeLocator(range(m),
        sorted values, S=sensitivity, curve="convex", direction="increasing")``, the FLUX
        reference's call). For a convex increasing curve Kneedle mirrors the curve, so it walks
        the difference curve from the LARGEST values down and its "first" knee is the one
        nearest the top. At each local maximum ``t`` of the walk (a point not below either
        neighbour; an end has one neighbour) the threshold becomes ``gap_t - sensitivity /
        (m - 1)`` (``1 / (m - 1)`` is the mean step of the normalised x); the knee is that
        maximum as soon as the next point of the walk is strictly below the threshold, before
        the next local maximum replaces it. ``None`` when no maximum is ever confirmed.
    sensitivity : float
        Kneedle's ``S`` (the reference uses kneed's default 1).
    after_minimum : {"wait", "reset"}
        ``rule="first"`` only, what a local minimum of the walk (a point not above either
        neighbour; a plateau point is both) does. ``"wait"`` (default, kneed >= 0.8.6, the
        version pip installs today): no knee is declared until the next local maximum.
        ``"reset"`` (kneed <= 0.8.5, the paper's "reset the threshold to 0"): the threshold
        becomes 0, so a walk that dips below the chord there confirms the last maximum. The
        two differ only where the curve rises above its chord; which kneed the reference ran
        is not pinned.

    Returns
    -------
    int or None
        Index into the sorted values; ``None`` (no knee) for fewer than 3 points, a flat curve,
        or as each rule says.

    Notes
    -----
    ``rule="first"`` rounds the gaps to 12 decimals before comparing them, so that ties (a
    straight curve, segments parallel to the chord) do not hinge on floating-point noise; kneed
    compares raw floats, so on a perfectly straight curve its answer depends on rounding.
    """
    if rule not in ("max", "first"):
        raise ValueError(f"rule must be 'max' or 'first', not {rule!r}")
    if after_minimum not in ("wait", "reset"):
        raise ValueError(f"after_minimum must be 'wait' or 'reset', not {after_minimum!r}")
    y = np.sort(np.asarray(values, dtype=np.float64))
    m = y.shape[0]
    if m < 3:
        return None
    span = y[-1] - y[0]
    if span <= _TINY * max(1.0, abs(y[-1])):
        return None
    gap = np.linspace(0.0, 1.0, m) - (y - y[0]) / span
    if rule == "max":
        i = int(np.argmax(gap))
        if gap[i] < min_gap:
            return None
        return i
    # Kneedle's walk over the mirrored curve: step t of the walk is index m - 1 - t.
    d = np.round(gap[::-1], 12)
    before = np.concatenate([d[:1], d[:-1]])  # an end is compared with its one neighbour only
    after = np.concatenate([d[1:], d[-1:]])
    is_max = (d >= before) & (d >= after)
    is_min = (d <= before) & (d <= after)
    step = sensitivity / (m - 1)
    threshold, anchor, armed = 0.0, -1, False
    for t in range(int(np.argmax(is_max)), m - 1):  # from the first local maximum
        if is_max[t]:
            threshold, anchor, armed = d[t] - step, t, True
        if is_min[t]:
            if after_minimum == "wait":
                armed = False
            else:
                threshold = 0.0
        if armed and d[t + 1] < threshold:
            return m - 1 - anchor
    return None


# --------------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------------
@state_type
@dataclass
class FluxClustering:
    """Result of :func:`cluster_descriptors`.

    Attributes
    ----------
    labels : np.ndarray
        ``[n]`` int64 cluster of each client, ``0..num_clusters-1`` (order of first appearance).
    num_clusters : int
    centroids : np.ndarray
        ``[Z, d]`` mean of the members' embeddings (full embedding; the label-free embedding when
        the descriptors were label-free).
    label_free_centroids : np.ndarray
        ``[Z, 2K]`` mean of the members' label-free embeddings (= ``centroids[:, :2K]``).
    normaliser : BlockNormaliser
        Fitted on the clustered descriptors; apply it unchanged to newcomers.
    missing_penalty : float
    method : str
    notes : list of str
        Fallbacks taken and guard decisions, human readable.
    routing_scatter : np.ndarray or None
        ``[2]`` pooled within-cluster variance per coordinate of the label-free blocks (marginal
        mean, marginal std): the label-free part of few-label routing
        (:func:`~flux_app.methods.flux.fewshot.route_with_labels`); None for clusterings made
        before it existed.
    """

    labels: np.ndarray
    num_clusters: int
    centroids: np.ndarray
    label_free_centroids: np.ndarray
    normaliser: BlockNormaliser
    missing_penalty: float = 1.0
    method: str = "hdbscan"
    notes: list[str] = field(default_factory=list)
    routing_scatter: np.ndarray | None = None
    #: the descriptor-noise inflation measured on validation pairs (None: not measured)
    inflation: float | None = None

    @property
    def sizes(self) -> np.ndarray:
        """``[Z]`` number of members per cluster."""
        return np.bincount(self.labels, minlength=self.num_clusters)

    @classmethod
    def from_labels(
        cls,
        x: np.ndarray,
        labels: np.ndarray,
        normaliser: BlockNormaliser,
        label_free_dim: int,
        *,
        missing_penalty: float = 1.0,
        method: str = "custom",
    ) -> FluxClustering:
        """A clustering from any labels of the embedded descriptors ``x`` (rows of
        :func:`embed`): labels renumbered ``0..Z-1`` in sorted order, centroids the cluster
        means, the first ``label_free_dim`` (= 2K) columns the label-free part routing uses.
        What a FLUX variant with its own clustering rule returns."""
        from flux_app.methods.flux.fewshot import routing_scatter

        labels = np.unique(np.asarray(labels), return_inverse=True)[1]
        centroids = np.stack([x[labels == z].mean(axis=0) for z in range(labels.max() + 1)])
        return cls(
            labels=labels,
            num_clusters=len(centroids),
            centroids=centroids,
            label_free_centroids=centroids[:, :label_free_dim],
            normaliser=normaliser,
            missing_penalty=missing_penalty,
            method=method,
            routing_scatter=routing_scatter(x[:, :label_free_dim], labels, label_free_dim // 2),
        )


def _apply_noise_policy(
    x: np.ndarray, labels: np.ndarray, policy: str, tolerance: float, notes: list[str]
) -> np.ndarray:
    labels = labels.copy()
    noise = labels < 0
    if not noise.any():
        return labels
    if noise.all():
        notes.append("all clients were labelled noise: fell back to one cluster")
        return np.zeros_like(labels)
    labels[~noise] = _relabel(labels[~noise])
    z = int(labels.max()) + 1
    n_noise = int(noise.sum())
    if policy == "singleton":
        labels[noise] = z + np.arange(n_noise)
        notes.append(f"{n_noise} noise client(s) became singleton clusters")
        return labels
    core = ~noise
    cent = _centroids(x[core], labels[core], z)
    member_d = np.linalg.norm(x[core] - cent[labels[core]], axis=1)
    r = np.array([np.median(member_d[labels[core] == p]) for p in range(z)])
    r_global = float(np.median(member_d))
    ref = np.maximum(r, r_global)
    near, dist = assign_to_centroids(x[noise], cent)
    attach = dist <= tolerance * ref[near] + _TINY
    idx = np.flatnonzero(noise)
    labels[idx[attach]] = near[attach]
    n_single = int((~attach).sum())
    labels[idx[~attach]] = z + np.arange(n_single)
    notes.append(
        f"{int(attach.sum())} noise client(s) attached to the nearest cluster, "
        f"{n_single} became singletons (tolerance {tolerance:g})"
    )
    return labels


def preload_libraries(clusterer: str) -> threading.Thread:
    """Import the clustering libraries in a background thread and return it.

    ``hdbscan`` with scikit-learn and scipy take ~2-3 s to import, which a fresh ServerApp
    process (every ``flwr run``, simulated or deployed) would otherwise pay inside its
    clustering round; started when the strategy is built, the import overlaps the warm-up
    rounds, where the server waits on its nodes. Not a daemon: an interpreter that exits
    first waits for it rather than killing an import half-way."""

    def load() -> None:
        try:
            if clusterer == "hdbscan":
                import hdbscan  # noqa: F401
            from scipy.stats import chi2  # noqa: F401
            from sklearn.neighbors import NearestNeighbors  # noqa: F401
        except Exception:  # noqa: BLE001 - the clustering round imports again and reports it
            pass

    thread = threading.Thread(target=load, name="flux-preload-clustering")
    thread.start()
    return thread


def _run_hdbscan(x: np.ndarray, min_cluster_size: int, allow_single_cluster: bool) -> np.ndarray:
    import hdbscan  # local import: heavy, and only this path needs it

    m = x.shape[0]
    mcs = min(max(2, int(min_cluster_size)), m)
    # Prim's MST is exact (the Boruvka variants default to an approximate MST and the ball-tree
    # one has known minimality bugs); O(m) memory, O(m^2 d) time for m <= max_dense clients.
    model = hdbscan.HDBSCAN(
        min_cluster_size=mcs,
        min_samples=1,
        allow_single_cluster=allow_single_cluster,
        algorithm="prims_kdtree",
        core_dist_n_jobs=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points give harmless divide warnings
        return np.asarray(model.fit_predict(x), dtype=np.int64)


def _run_knee_dbscan(
    x: np.ndarray, notes: list[str], rule: str = "first", after_minimum: str = "wait"
) -> np.ndarray:
    """Knee-DBSCAN labels of the embedded clients ``x`` (``-1`` = noise).

    ``eps`` is the sorted 1-NN distance at :func:`knee_point`'s knee (``rule="first"``: the
    reference's kneed rule; ``"max"``: the largest gap below the chord, this module's rule
    before), the largest 1-NN distance when there is none (with a note). sklearn's DBSCAN counts
    a neighbour at distance ``<= eps``, so in the reference's ``DBSCAN(eps=knee value)`` the
    knee client's own nearest neighbour is inside in exact arithmetic; but DBSCAN recomputes the
    distance another way than ``kneighbors`` did, and the last-bit difference left the client
    whose 1-NN distance was ``eps`` without that neighbour in about a quarter of random trials.
    ``eps * (1 + 1e-9)`` keeps the exact-arithmetic answer.
    """
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=2).fit(x)
    d, _ = nn.kneighbors(x)
    d1 = d[:, 1]
    i = knee_point(d1, rule=rule, after_minimum=after_minimum)
    if i is None:
        eps = float(d1.max())
        notes.append("no knee in the 1-NN distance curve: eps = largest 1-NN distance")
    else:
        eps = float(np.sort(d1)[i])
    scale = float(np.median(np.linalg.norm(x - np.median(x, axis=0), axis=1)))
    eps = max(eps, 1e-9 * max(scale, 1.0))  # DBSCAN needs eps > 0 (duplicates give 0)
    eps *= 1.0 + 1e-9  # a neighbour exactly at eps is inside (sklearn: distance <= eps)
    from sklearn.cluster import DBSCAN

    return np.asarray(DBSCAN(eps=eps, min_samples=2).fit_predict(x), dtype=np.int64)


def _guard_weights(v: np.ndarray, cap: float | None = None) -> np.ndarray | None:
    """Per-client weights of the IID guard's centroids, ``None`` when all are 1.

    Parameters
    ----------
    v : np.ndarray
        ``[m, d]`` sampling variances of the clients' embeddings.
    cap : float, optional
        A client's total variance counts at most ``cap`` times the median client's (default
        :data:`NOISE_WEIGHT_CAP`).

    Returns
    -------
    np.ndarray or None
        ``[m]`` weights ``min(1, cap * median(V) / V_i)`` with ``V_i = sum_j v_ij``; ``None``
        when every weight is 1 (the guard's unweighted statistic, bit for bit).
    """
    cap = NOISE_WEIGHT_CAP if cap is None else cap
    total = v.sum(axis=1)
    limit = cap * float(np.median(total))
    if not np.any(total > limit) or limit <= 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > limit, limit / total, 1.0)


def _iid_guard(
    x: np.ndarray,
    v: np.ndarray,
    labels: np.ndarray,
    ratio: float,
    alpha: float,
    notes: list[str],
    inflation: float | None = None,
) -> np.ndarray:
    """Merge clusters whose separation is not significant against sampling noise
    (``inflation``: the measured noise inflation; None = estimate it from the clusters)."""
    labels = _relabel(labels)
    z = int(labels.max()) + 1
    if z == 1:
        return labels
    sums, sizes = _cluster_sums(x, labels, z)
    vsum, _ = _cluster_sums(v, labels, z)
    # Noise inflation from within-cluster residuals (clusters of size >= 2).
    cent = sums / sizes[:, None]
    big = sizes[labels] >= 2
    measured = inflation is not None
    inflation = 1.0 if inflation is None else float(inflation)
    if big.any() and not measured:
        mi = sizes[labels][big]
        resid = np.sum((x[big] - cent[labels[big]]) ** 2, axis=1)
        expect = np.sum(
            v[big] * (1.0 - 2.0 / mi)[:, None] + vsum[labels[big]] / (mi**2)[:, None], axis=1
        )
        ok = expect > 0
        if ok.any():
            vv = v[big][ok]
            nu = np.median(vv.sum(1) ** 2 / np.maximum((vv**2).sum(1), 1e-300))
            from scipy.stats import chi2

            raw = float(np.median(resid[ok] / expect[ok])) / (chi2.median(nu) / nu)
            inflation = float(np.clip(raw, 1.0, MAX_INFLATION))
    if inflation > 1.0 + 1e-9 and not measured:
        notes.append(
            f"IID guard: descriptor noise inflated by {inflation:.2f} (within-cluster residuals)"
        )
    # The merge statistic's centroids: noisy clients down-weighted (_guard_weights).
    w = _guard_weights(v)
    if w is not None:
        sums, _ = _cluster_sums(x * w[:, None], labels, z)
        vsum, _ = _cluster_sums(v * (w**2)[:, None], labels, z)
        sizes = np.bincount(labels, weights=w, minlength=z).astype(np.float64)
        notes.append(
            f"IID guard: {int(np.sum(w < 1))} client(s) with noise above {NOISE_WEIGHT_CAP:g}x "
            "the median down-weighted"
        )
    n_pairs = max(1, z * (z - 1) // 2)
    alive = np.ones(z, dtype=bool)
    merges = 0
    while alive.sum() > 1:
        ids = np.flatnonzero(alive)
        cz = sums[ids] / sizes[ids, None]
        vc = vsum[ids] / (sizes[ids] ** 2)[:, None] * inflation
        a = vc.sum(axis=1)
        b = (vc**2).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            nu = np.where(b > 0, a**2 / np.where(b > 0, b, 1.0), np.inf)
        q = np.ones_like(nu)
        fin = np.isfinite(nu)
        from scipy.stats import chi2

        q[fin] = chi2.isf(alpha / n_pairs, nu[fin]) / nu[fin]
        thr = np.maximum(ratio, q)
        # Pairwise squared distances of centroids via centred Gram products, in row chunks.
        cz = cz - cz.mean(axis=0)
        sq = np.sum(cz**2, axis=1)
        k = len(ids)
        best = np.empty(k, dtype=np.int64)
        best_s = np.empty(k)
        chunk = max(1, int(4_000_000 // max(k, 1)))
        for s in range(0, k, chunk):
            e = min(k, s + chunk)
            d2 = np.maximum(sq[s:e, None] + sq[None, :] - 2.0 * cz[s:e] @ cz.T, 0.0)
            ex = a[s:e, None] + a[None, :]
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.where(
                    ex > 0, d2 / np.where(ex > 0, ex, 1.0), np.where(d2 > _TINY, np.inf, 0.0)
                )
            score = t / np.maximum(thr[s:e, None], thr[None, :])
            score[np.arange(e - s), np.arange(s, e)] = np.inf
            best[s:e] = np.argmin(score, axis=1)
            best_s[s:e] = score[np.arange(e - s), best[s:e]]
        cand = np.flatnonzero((best_s < 1.0) & (best[best] == np.arange(k)))
        pairs = [(i, int(best[i])) for i in cand if i < best[i]]
        if not pairs:
            if np.min(best_s) < 1.0:  # ties broke mutuality: merge the single best pair
                i = int(np.argmin(best_s))
                pairs = [(min(i, int(best[i])), max(i, int(best[i])))]
            else:
                break
        for i, j in pairs:
            p, r = ids[i], ids[j]
            sums[p] += sums[r]
            vsum[p] += vsum[r]
            sizes[p] += sizes[r]
            alive[r] = False
            labels[labels == r] = p
            merges += 1
    remaining = int(alive.sum())
    if merges:
        if remaining == 1:
            notes.append("IID guard: no structure beyond sampling noise: one cluster")
        else:
            notes.append(
                f"IID guard: merged {merges} non-significant pair(s), {remaining} clusters left"
            )
    return _relabel(labels)


def measured_inflation(
    train: Sequence[FluxDescriptor | None],
    check: Sequence[FluxDescriptor | None],
    normaliser: BlockNormaliser,
) -> float | None:
    """The descriptor-noise inflation ``lambda`` measured on pairs of one client's descriptors.

    ``check[i]`` is client ``i``'s descriptor of a second, disjoint sample of its own
    distribution (its validation split). Both estimate the same moments, so (module docstring,
    "Small groups") ``E||e_train - e_check||^2 = lambda (V_train + V_check)`` over the
    coordinates both observe; ``lambda`` is the median over clients of that ratio, divided by
    the chi-square median so that it is 1 when the noise model holds, and clipped to
    ``[1, MAX_INFLATION]``. No clustering is involved, so mixed clusters cannot inflate it.

    Returns
    -------
    float or None
        None when fewer than 2 clients have a usable pair.
    """
    usable = [
        i
        for i, (a, b) in enumerate(zip(train, check, strict=True))
        if a is not None and b is not None and not a.is_label_free and not b.is_label_free
    ]
    if len(usable) < 2:
        return None
    ratio, nu = pair_ratios([train[i] for i in usable], [check[i] for i in usable], normaliser)
    ok = np.isfinite(nu)
    if ok.sum() < 2:
        return None
    from scipy.stats import chi2

    nu_med = float(np.median(nu[ok]))
    raw = float(np.median(ratio[ok])) / (chi2.median(nu_med) / nu_med)
    return float(np.clip(raw, 1.0, MAX_INFLATION))


def pair_ratios(
    first: Sequence[FluxDescriptor], second: Sequence[FluxDescriptor], normaliser: BlockNormaliser
) -> tuple[np.ndarray, np.ndarray]:
    """For pairs of full descriptors of the same clients: ``||e_1 - e_2||^2 / (V_1 + V_2)`` over
    the coordinates both observe (label-free blocks, classes with ``n_c >= 2`` at both), and its
    effective degrees of freedom (``inf`` where no coordinate has sampling variance).

    Under "same distribution" the ratio is ``lambda * chi2(nu) / nu`` (``lambda``: the noise
    inflation). Used to measure ``lambda`` (:func:`measured_inflation`) and to notice drift.
    """
    sa = _stack(list(first), label_free=False)
    sb = _stack(list(second), label_free=False)
    xa, xb = _embed_stack(sa, normaliser, 0.0), _embed_stack(sb, normaliser, 0.0)
    va, vb = _noise_var_stack(sa, normaliser), _noise_var_stack(sb, normaliser)
    k, c, m = normaliser.dim, normaliser.num_classes, len(first)
    both = np.repeat(sa.present & sb.present, k, axis=1)  # [m, C*K]
    mask = np.concatenate([np.ones((m, 2 * k), bool), both, both, np.zeros((m, c), bool)], 1)
    var = np.where(mask, va + vb, 0.0)
    total = var.sum(axis=1)
    dist = np.where(mask, (xa - xb) ** 2, 0.0).sum(axis=1)
    ok = total > 0
    ratio = np.where(ok, dist / np.where(ok, total, 1.0), np.where(dist > 0, np.inf, 0.0))
    nu = np.where(ok, total**2 / np.maximum((var**2).sum(axis=1), 1e-300), np.inf)
    return ratio, nu


def _dissolve_mixed(
    x: np.ndarray,
    v: np.ndarray,
    labels: np.ndarray,
    inflation: float,
    ratio: float,
    alpha: float,
    notes: list[str],
) -> np.ndarray:
    """Split every cluster with a member significantly unlike the rest into singletons.

    Member ``i`` of cluster ``p`` (``|p| >= 2``) against the centroid of the other members:
    ``T_i = ||x_i - c_{p-i}||^2 / (lambda (V_i + Var(c_{p-i})))``, significant when above the
    guard's threshold ``max(ratio, chi2_{1-alpha/n}(nu_i) / nu_i)``. A significant member means
    the density clustering joined distributions the noise model tells apart, so the cluster
    is returned to its members and the guard (which only merges) rebuilds what is not
    significantly different. Returns new labels (relabelled).
    """
    labels = _relabel(labels)
    z = int(labels.max()) + 1
    sums, sizes = _cluster_sums(x, labels, z)
    vsum, _ = _cluster_sums(v, labels, z)
    n = x.shape[0]
    m = sizes[labels]
    multi = m >= 2
    if not multi.any():
        return labels
    from scipy.stats import chi2

    rest = np.where(multi, m - 1.0, 1.0)
    c_rest = (sums[labels] - x) / rest[:, None]
    var_rest = (vsum[labels] - v) / (rest**2)[:, None]
    vv = v + var_rest
    e = inflation * vv.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(e > 0, np.sum((x - c_rest) ** 2, axis=1) / np.where(e > 0, e, 1.0), 0.0)
        nu = np.where(
            (vv**2).sum(axis=1) > 0,
            vv.sum(axis=1) ** 2 / np.maximum((vv**2).sum(axis=1), 1e-300),
            np.inf,
        )
    q = np.ones(n)
    fin = np.isfinite(nu) & multi
    q[fin] = chi2.isf(alpha / max(1, n), nu[fin]) / nu[fin]
    bad = multi & (t > np.maximum(ratio, q))
    mixed = np.unique(labels[bad])
    if not len(mixed):
        return labels
    out = labels.copy()
    nxt = z
    for p in mixed:
        members = np.flatnonzero(labels == p)
        out[members[1:]] = np.arange(nxt, nxt + len(members) - 1)
        nxt += len(members) - 1
    notes.append(
        f"small groups: {len(mixed)} cluster(s) held a member significantly unlike the rest "
        "(measured descriptor noise): returned to their members for the guard"
    )
    return _relabel(out)


def _without_weak_evidence(
    st: _Stack, nz: BlockNormaliser, subset: np.ndarray | None, notes: list[str]
) -> np.ndarray | None:
    """The clients to cluster directly: ``subset`` (or all) less those with too little evidence.

    A client whose total descriptor noise exceeds :data:`NOISE_WEIGHT_CAP` times the median
    client's (a tiny sample, or a claim of one) cannot say where it belongs: its unobserved
    classes are imputed with the federation's means, which puts it between every group, where
    single-linkage density clustering would take it as a bridge. It is placed afterwards, at the
    nearest centroid, like the clients outside a ``max_dense`` subset.
    """
    idx = np.arange(st.mu.shape[0]) if subset is None else subset
    total = _noise_var_stack(st.take(idx), nz).sum(axis=1)
    weak = total > NOISE_WEIGHT_CAP * float(np.median(total))
    if not weak.any() or (~weak).sum() < 2:
        return subset
    notes.append(
        f"{int(weak.sum())} client(s) with descriptor noise above {NOISE_WEIGHT_CAP:g}x the "
        "median placed at the nearest centroid, not clustered"
    )
    return idx[~weak]


def cluster_descriptors(
    descriptors: Sequence[FluxDescriptor],
    method: str = "hdbscan",
    min_cluster_size: int = 2,
    noise_policy: str = "attach",
    attach_tolerance: float = 2.0,
    iid_guard: bool = True,
    missing_penalty: float = 1.0,
    max_dense: int = 5000,
    seed: int = 0,
    *,
    guard_ratio: float = GUARD_RATIO,
    guard_alpha: float = GUARD_ALPHA,
    noise_floor: float = 3.0,
    noise_check: Sequence[FluxDescriptor | None] | None = None,
) -> FluxClustering:
    """Cluster client descriptors without a given number of clusters.

    Parameters
    ----------
    descriptors : sequence of FluxDescriptor
        All full, or all label-free (then only the label-free embedding is used).
    method : {"hdbscan", "knee-dbscan"}
    min_cluster_size : int
        HDBSCAN's minimum cluster size (at least 2).
    noise_policy : {"attach", "singleton"}
        What happens to noise clients (see module docstring).
    attach_tolerance : float
        Multiple of a cluster's typical member radius within which a noise client is attached.
    iid_guard : bool
        Merge clusters not separated beyond sampling noise.
    missing_penalty : float
        Squared-distance cost of a class present at exactly one of two clients.
    max_dense : int
        Largest number of clients clustered directly; above it a seeded subset is clustered and
        the rest assigned to the nearest centroid.
    seed : int
        Seed of the subset draw.
    guard_ratio, guard_alpha : float
        IID-guard threshold parts (see module docstring).
    noise_floor : float
        Normaliser noise floor (see :class:`BlockNormaliser`).
    noise_check : sequence of FluxDescriptor or None, optional
        Each client's descriptor of a second, disjoint sample (its validation split; None
        where it has none). With the IID guard on and two usable pairs, the noise inflation is
        measured on them (:func:`measured_inflation`) instead of estimated from the clusters,
        noise points become singletons and a cluster with a significantly unlike member is
        returned to its members before the guard merges (module docstring, "Small groups").

    Returns
    -------
    FluxClustering
    """
    if method not in ("hdbscan", "knee-dbscan"):
        raise ValueError(f"method must be 'hdbscan' or 'knee-dbscan', got {method!r}")
    if noise_policy not in ("attach", "singleton"):
        raise ValueError(f"noise_policy must be 'attach' or 'singleton', got {noise_policy!r}")
    if missing_penalty < 0 or attach_tolerance < 0:
        raise ValueError("missing_penalty and attach_tolerance must be >= 0")
    if max_dense < 2:
        raise ValueError("max_dense must be >= 2")
    st = _stack(descriptors)
    n = st.mu.shape[0]
    nz = BlockNormaliser._fit_stack(st, scale=True, noise_floor=noise_floor)
    x = _embed_stack(st, nz, missing_penalty)
    notes: list[str] = []
    if st.label_free:
        notes.append("label-free descriptors: clustering on the marginal moments only")

    subset = None
    if n > max_dense:
        rng = np.random.default_rng(seed)
        subset = np.sort(rng.choice(n, size=max_dense, replace=False))
        notes.append(
            f"{n} clients > max_dense={max_dense}: clustered a random subset, assigned the rest"
        )
    if not st.label_free:
        subset = _without_weak_evidence(st, nz, subset, notes)
    xs = x if subset is None else x[subset]
    m = xs.shape[0]
    inflation = None
    if iid_guard and noise_check is not None and not st.label_free:
        if len(noise_check) != n:
            raise ValueError(f"noise_check has {len(noise_check)} entries for {n} descriptors")
        inflation = measured_inflation(descriptors, noise_check, nz)
        if inflation is not None:
            notes.append(
                f"descriptor noise inflation {inflation:.2f}, measured on the clients' "
                "validation descriptors"
            )
            noise_policy = "singleton"  # the guard's test decides where noise points belong

    spread = np.ptp(xs, axis=0).max() if m > 1 else 0.0
    if m == 1:
        labels_s = np.zeros(1, dtype=np.int64)
        notes.append("single client: one cluster")
    elif spread <= _TINY * max(1.0, float(np.abs(xs).max())):
        labels_s = np.zeros(m, dtype=np.int64)
        notes.append("all descriptors identical: one cluster")
    elif m == 2:
        if iid_guard:
            labels_s = np.arange(2, dtype=np.int64)  # the guard decides whether they differ
        else:
            labels_s = np.zeros(2, dtype=np.int64)
            notes.append(
                "two clients and no IID guard: one cluster (too few for density clustering)"
            )
    else:
        if method == "hdbscan":
            # With the guard on, HDBSCAN may over-split (the guard merges back what noise
            # explains); forcing it to choose between one cluster and a split loses weak groups.
            raw = _run_hdbscan(xs, min_cluster_size, allow_single_cluster=not iid_guard)
        else:
            raw = _run_knee_dbscan(xs, notes)
        labels_s = _apply_noise_policy(xs, raw, noise_policy, attach_tolerance, notes)
    labels_s = _relabel(labels_s)
    if iid_guard and inflation is not None and m > 1:
        vs = _noise_var_stack(st if subset is None else st.take(subset), nz)
        labels_s = _dissolve_mixed(xs, vs, labels_s, inflation, guard_ratio, guard_alpha, notes)
    if iid_guard and labels_s.max() > 0:
        vs = _noise_var_stack(st if subset is None else st.take(subset), nz)
        labels_s = _iid_guard(xs, vs, labels_s, guard_ratio, guard_alpha, notes, inflation)

    z = int(labels_s.max()) + 1
    if subset is None:
        labels = labels_s
    else:
        cent = _centroids(xs, labels_s, z)
        labels, _ = assign_to_centroids(x, cent)
        labels[subset] = labels_s  # the subset keeps its own clustering (no cluster empties)
    centroids = _centroids(x, labels, z)
    k2 = 2 * st.mu.shape[1]
    from flux_app.methods.flux.fewshot import routing_scatter

    return FluxClustering(
        labels=labels,
        num_clusters=z,
        centroids=centroids,
        label_free_centroids=centroids[:, :k2].copy(),
        normaliser=nz,
        missing_penalty=missing_penalty,
        method=method,
        notes=notes,
        routing_scatter=routing_scatter(x[:, :k2], labels, k2 // 2),
        inflation=inflation,
    )


# --------------------------------------------------------------------------------------------
# Routing and metrics
# --------------------------------------------------------------------------------------------
def route_many(
    descriptors: Sequence[FluxDescriptor], clustering: FluxClustering
) -> tuple[np.ndarray, np.ndarray]:
    """Route many (label-free or full) descriptors by their label-free part.

    Returns
    -------
    clusters : np.ndarray
        ``[m]`` int64 index of the nearest label-free centroid (lowest index on ties).
    distances : np.ndarray
        ``[m, Z]`` Euclidean distances to every label-free centroid.
    """
    e = label_free_embed(descriptors, clustering.normaliser)
    c = clustering.label_free_centroids
    d = np.empty((e.shape[0], c.shape[0]))
    chunk = max(1, 2_000_000 // max(1, c.shape[0] * c.shape[1]))
    # Exact differences (no Gram cancellation) in chunks of bounded memory.
    for s in range(0, e.shape[0], chunk):
        diff = e[s : s + chunk, None, :] - c[None, :, :]
        d[s : s + chunk] = np.sqrt(np.sum(diff * diff, axis=2))
    return np.argmin(d, axis=1).astype(np.int64), d


def route(label_free: FluxDescriptor, clustering: FluxClustering) -> tuple[int, np.ndarray]:
    """Nearest cluster of one newcomer by its label-free descriptor (same fitted scales).

    Returns
    -------
    cluster : int
    distances : np.ndarray
        ``[Z]`` distances to every cluster's label-free centroid.
    """
    c, d = route_many([label_free], clustering)
    return int(c[0]), d[0]


def ari_nmi(
    true_groups: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> tuple[float, float]:
    """Adjusted Rand index and normalised mutual information (scikit-learn)."""
    t = np.asarray(true_groups)
    p = np.asarray(labels)
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return float(adjusted_rand_score(t, p)), float(normalized_mutual_info_score(t, p))
