r"""Few-label routing: a routed client that holds ``k`` labelled samples per class.

A label-free descriptor cannot see a shift of ``P(Y|X)`` (a label permutation leaves the inputs
unchanged), so label-free routing sends such a client to whichever cluster's inputs look alike.
A few labelled samples make the class-conditional part visible again. With ``routing-labels=k``
a routed client sends, next to its label-free descriptor (all its inputs), the class moments of
up to ``k`` labelled samples per class (:class:`ClassSample`); the server scores every cluster by
the log-likelihood of both (:func:`route_with_labels`):

Label-free part
    The client's label-free embedding ``e`` against the cluster's label-free centroid ``c_z``,
    with one variance per block (marginal mean, marginal std) shared by every cluster: the
    pooled within-cluster scatter of the training clients (:func:`routing_scatter`), so
    ``-2 log L_lf(z) = sum_b ||e_b - c_zb||^2 / s_b^2`` (+ a constant). With equal block
    variances this ranks clusters exactly as label-free routing does.

Labelled part
    The labelled samples of class ``c`` are scored under the cluster's class-``c`` Gaussian
    ``N(m_zc, diag s_zc^2)`` (raw projected units: the cluster's centroid of the members' class
    moments, or the federation's means where no member holds the class). Their exact Gaussian
    log-likelihood needs only the client's class count ``n_c``, mean ``xbar`` and (unbiased)
    std ``sd``:

    ``-2 log L_c(z) = sum_j [n_c (xbar_j - m_j)^2 + (n_c - 1) sd_j^2] / s_j^2 + n_c log s_j^2``

    so one labelled sample (``n_c = 1``, no std) already counts, with its own weight: the
    moments of ``k`` samples are noisy, and the likelihood weighs them by exactly their sampling
    variance ``s^2 / n_c``. Classes without a labelled sample contribute nothing.

The cluster with the smallest ``-2 log L_lf - 2 sum_c log L_c`` wins. ``k = 0`` is label-free
routing (:func:`~flux_app.methods.flux.clustering.route_many`), unchanged.

Privacy: the class moments of ``k`` samples (one sample's projected features for ``n_c = 1``)
leave the client; they are not noised, so ``routing-labels`` is refused together with descriptor
noise (``flux-dp-noise > 0``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flux_app.methods.flux.descriptors import (
    MAX_ABS_VALUE,
    DescriptorError,
    FluxDescriptor,
    MomentAccumulator,
    _as_array,
    accumulate_moments,
)

#: largest labelled samples per class a routed client may use
MAX_ROUTING_LABELS = 10_000
_TINY = 1e-12


def select_labelled(y: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of up to ``k`` samples of every class in ``y`` (seeded, without replacement).

    Parameters
    ----------
    y : torch.Tensor
        ``[n]`` integer labels.
    k : int
        Samples per class (a class with fewer gives all it has).
    seed : int
        Seed of the draw (a client draws the same samples in every run with this seed).

    Returns
    -------
    torch.Tensor
        ``[m]`` int64 indices, sorted.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    y = torch.as_tensor(y).reshape(-1).long()
    if k == 0 or y.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    order = torch.randperm(y.numel(), generator=g)
    picked = []
    for c in torch.unique(y).tolist():
        members = order[y[order] == c]
        picked.append(members[:k])
    return torch.sort(torch.cat(picked)).values


@dataclass
class ClassSample:
    """Class moments of a routed client's few labelled samples (projected features).

    Attributes
    ----------
    class_mu : np.ndarray
        ``[C, K]`` mean of each class's labelled samples (zeros where ``counts == 0``).
    class_sigma : np.ndarray
        ``[C, K]`` unbiased std (zeros where ``counts < 2``).
    counts : np.ndarray
        ``[C]`` int64 labelled samples per class.
    """

    class_mu: np.ndarray
    class_sigma: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        self.class_mu = np.array(self.class_mu, dtype=np.float64, copy=True)
        self.class_sigma = np.array(self.class_sigma, dtype=np.float64, copy=True)
        self.counts = np.array(self.counts, dtype=np.int64, copy=True).reshape(-1)
        c = self.counts.shape[0]
        if self.class_mu.ndim != 2 or self.class_mu.shape[0] != c:
            raise ValueError(f"class_mu has shape {self.class_mu.shape}, expected ({c}, K)")
        if self.class_sigma.shape != self.class_mu.shape:
            raise ValueError("class_sigma and class_mu differ in shape")
        self.class_mu[self.counts == 0] = 0.0
        self.class_sigma[self.counts < 2] = 0.0

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for an ``ArrayRecord`` (float32 moments, int64 counts)."""
        return {
            "class_mu": self.class_mu.astype(np.float32),
            "class_sigma": self.class_sigma.astype(np.float32),
            "class_counts": self.counts.astype(np.int64),
        }

    @classmethod
    def from_arrays(
        cls, d: Mapping[str, np.ndarray], num_classes: int, dim: int, max_per_class: int
    ) -> ClassSample:
        """Build from untrusted arrays, validating keys, shapes, dtypes, values and counts.

        Raises
        ------
        DescriptorError
            Missing or extra keys, wrong shape or dtype kind, non-finite or too large values,
            a negative std, or a count outside ``[0, max_per_class]``.
        """
        if not isinstance(d, Mapping):
            raise DescriptorError(f"expected a mapping of arrays, got {type(d).__name__}")
        expected = {"class_mu", "class_sigma", "class_counts"}
        if set(d) != expected:
            raise DescriptorError(
                f"labelled sample keys {sorted(map(str, d))}, expected {sorted(expected)}"
            )
        out = {}
        for key in ("class_mu", "class_sigma"):
            a = _as_array(d[key], key)
            if a.dtype.kind != "f":
                raise DescriptorError(f"{key}: dtype {a.dtype} is not floating point")
            if a.shape != (num_classes, dim):
                raise DescriptorError(f"{key}: shape {a.shape}, expected {(num_classes, dim)}")
            a = a.astype(np.float64)
            if not np.all(np.isfinite(a)) or np.any(np.abs(a) > MAX_ABS_VALUE):
                raise DescriptorError(f"{key}: non-finite or too large value(s)")
            if key == "class_sigma" and np.any(a < 0):
                raise DescriptorError(f"{key}: negative standard deviation")
            out[key] = a
        counts = _as_array(d["class_counts"], "class_counts")
        if counts.dtype.kind not in "iu":
            raise DescriptorError(f"class_counts: dtype {counts.dtype} is not integer")
        if counts.shape != (num_classes,):
            raise DescriptorError(f"class_counts: shape {counts.shape}, expected ({num_classes},)")
        if np.any(counts < 0) or np.any(counts > max_per_class):
            raise DescriptorError(f"class_counts: a count outside [0, {max_per_class}]")
        return cls(out["class_mu"], out["class_sigma"], counts.astype(np.int64))


def compute_class_sample(
    features: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    projection: torch.Tensor,
    num_classes: int,
    clip_norm: float = 0.0,
    batch_size: int = 512,
) -> ClassSample:
    """Class moments of the labelled samples ``(x, y)``: features -> (clip) -> project.

    The same feature map, clip and projection as
    :func:`~flux_app.methods.flux.descriptors.compute_flux_descriptor`.
    """
    parts = ((x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(x), batch_size))
    acc = accumulate_moments(features, parts, projection, num_classes, clip_norm=clip_norm)
    counts = acc.class_count.round().to(torch.int64).numpy()
    sigma = MomentAccumulator._std(acc.class_count, acc.class_m2).numpy()
    return ClassSample(acc.class_mean.numpy(), sigma, counts)


def routing_scatter(x_lf: np.ndarray, labels: np.ndarray, dim: int) -> np.ndarray:
    """``[2]`` per-coordinate variance of the label-free blocks (marginal mean, marginal std)
    around their cluster centroids, pooled over the clusters with >= 2 members.

    Parameters
    ----------
    x_lf : np.ndarray
        ``[n, 2K]`` label-free embeddings of the clustered clients.
    labels : np.ndarray
        ``[n]`` their clusters.
    dim : int
        ``K``.

    Returns
    -------
    np.ndarray
        ``[s_mu^2, s_sigma^2]``; where no cluster has two members, the per-coordinate variance
        of all clients around their mean divided by the number of clients (the scale at which
        a centroid is known), floored at a tiny positive value.
    """
    labels = np.asarray(labels)
    out = np.zeros(2)
    dof = 0.0
    for z in np.unique(labels):
        rows = x_lf[labels == z]
        if len(rows) < 2:
            continue
        r = rows - rows.mean(axis=0)
        out += [np.sum(r[:, :dim] ** 2), np.sum(r[:, dim:] ** 2)]
        dof += (len(rows) - 1) * dim
    if dof > 0:
        out /= dof
    else:
        r = x_lf - x_lf.mean(axis=0)
        n = max(1, len(x_lf))
        out = np.array([np.mean(r[:, :dim] ** 2), np.mean(r[:, dim:] ** 2)]) / n
    return np.maximum(out, _TINY)


def class_neg2_log_likelihood(sample: ClassSample, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``-2 log L`` of the labelled samples under each cluster's class Gaussians.

    Parameters
    ----------
    sample : ClassSample
        ``C`` classes, ``K`` dims.
    mean, std : np.ndarray
        ``[Z, C, K]`` the clusters' class means and stds (raw projected units).

    Returns
    -------
    np.ndarray
        ``[Z]``, constants dropped (they are equal for every cluster).
    """
    n = sample.counts.astype(np.float64)[None, :, None]
    var = np.maximum(std, 0.0) ** 2
    floor = max(_TINY, 1e-6 * float(np.median(var)) if var.size else _TINY)
    var = np.maximum(var, floor)
    ss = (
        n * (sample.class_mu[None] - mean) ** 2
        + np.maximum(n - 1.0, 0.0) * sample.class_sigma[None] ** 2
    )
    terms = ss / var + n * np.log(var)
    return terms.sum(axis=(1, 2))


def route_with_labels(
    label_free: Sequence[FluxDescriptor],
    samples: Sequence[ClassSample],
    clustering: object,
) -> tuple[np.ndarray, np.ndarray]:
    """Route clients by their label-free descriptors AND few labelled samples (module docstring).

    Parameters
    ----------
    label_free : sequence of FluxDescriptor
        The clients' label-free descriptors (all their inputs).
    samples : sequence of ClassSample
        Their labelled class moments, in the same order.
    clustering : FluxClustering
        A clustering of full descriptors (its centroids hold the class blocks).

    Returns
    -------
    clusters : np.ndarray
        ``[m]`` int64, the cluster of highest likelihood (lowest index on ties).
    scores : np.ndarray
        ``[m, Z]`` ``-2 log L`` of every cluster (constants dropped).
    """
    from flux_app.methods.flux.clustering import label_free_embed

    if len(label_free) != len(samples):
        raise ValueError("one labelled sample per label-free descriptor")
    nz = clustering.normaliser
    if nz.label_free:
        raise ValueError("few-label routing needs a clustering of full (labelled) descriptors")
    k, c = nz.dim, nz.num_classes
    z = clustering.num_clusters
    scatter = clustering.routing_scatter
    if scatter is None:  # a clustering saved before it existed: the normaliser scales a
        # block's typical client-to-median distance to ~1, i.e. ~1/K per coordinate
        scatter = np.full(2, 1.0 / k)
    e = label_free_embed(label_free, nz)
    lf = clustering.label_free_centroids
    d_mu = np.sum((e[:, None, :k] - lf[None, :, :k]) ** 2, axis=2) / scatter[0]
    d_sig = np.sum((e[:, None, k:] - lf[None, :, k:]) ** 2, axis=2) / scatter[1]
    cent = clustering.centroids
    start = 2 * k
    mean = cent[:, start : start + c * k].reshape(z, c, k) * nz.scale_class_mu
    std = cent[:, start + c * k : start + 2 * c * k].reshape(z, c, k) * nz.scale_class_sigma
    scores = np.empty((len(samples), z))
    for i, s in enumerate(samples):
        if s.counts.shape[0] != c or s.class_mu.shape[1] != k:
            raise ValueError(
                f"labelled sample has {s.counts.shape[0]} classes x "
                f"{s.class_mu.shape[1]} dims, the clustering {c} x {k}"
            )
        scores[i] = d_mu[i] + d_sig[i] + class_neg2_log_likelihood(s, mean, std)
    return np.argmin(scores, axis=1).astype(np.int64), scores


__all__ = [
    "MAX_ROUTING_LABELS",
    "ClassSample",
    "class_neg2_log_likelihood",
    "compute_class_sample",
    "route_with_labels",
    "routing_scatter",
    "select_labelled",
]
