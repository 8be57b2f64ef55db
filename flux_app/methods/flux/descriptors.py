"""FLUX client descriptors: projected feature moments, marginal and per class.

A client passes its local data once through the frozen extractor ``E`` (the global model at the
clustering round), projects each feature vector ``f(x) in R^D`` to ``z = P f(x) in R^K`` with a
shared random matrix ``P`` (orthonormal rows, drawn from a seed every party knows), and reports
per-dimension means and standard deviations of ``z``:

* marginal ``mu, sigma`` over all samples (``2K`` numbers, label-free: usable by unseen, unlabeled
  clients for routing);
* per class ``c``: ``mu_c, sigma_c`` and the count ``n_c`` (``2KC`` floats + ``C`` counts).

A class with fewer than 2 samples is *absent*. Absence is carried by the counts (``present =
class_counts >= 2``); absent rows are stored as zeros and never read. There is no sentinel value
(the reference implementation's ``-1`` collides with real moments).

Statistics are accumulated in one streaming pass in float64 (count, mean and centred sum of
squares per group, merged batch by batch with Chan et al.'s parallel update: the same information
as sums and sums of squares, without their cancellation when ``|mean| >> std``). Latents are never
kept. ``sigma`` is the square root of the *unbiased* variance (``ddof=1``): the descriptor
estimates the client's feature *distribution*, and ``n_c >= 2`` is exactly what ``ddof=1`` needs.

Optional privacy (:func:`privatize`) adds Gaussian or Laplace noise calibrated to a sensitivity
bound that holds because feature vectors were clipped to a known L2 norm before projection.

This module is pure torch/numpy: no Flower imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from flux_app.common.statecodec import state_type

__all__ = [
    "MAX_ABS_VALUE",
    "MAX_COUNT",
    "DescriptorError",
    "FluxDescriptor",
    "MomentAccumulator",
    "accumulate_moments",
    "compute_flux_descriptor",
    "descriptor_keys",
    "moment_sensitivity",
    "privatize",
    "projection_matrix",
]

#: Largest magnitude accepted for any moment in an untrusted descriptor. Projected features of
#: a sane model are O(1..100); anything beyond this is corrupt or adversarial.
MAX_ABS_VALUE = 1e6
#: Largest sample count accepted in an untrusted descriptor.
MAX_COUNT = 10**12

_MOMENT_KEYS = ("mu", "sigma")
_CLASS_MOMENT_KEYS = ("class_mu", "class_sigma")


class DescriptorError(ValueError):
    """An (untrusted) descriptor payload failed validation; the message says why."""


def descriptor_keys(label_free: bool) -> tuple[str, ...]:
    """Keys of :meth:`FluxDescriptor.to_arrays` for a full or a label-free descriptor."""
    if label_free:
        return ("mu", "sigma", "n")
    return ("mu", "sigma", "n", "class_mu", "class_sigma", "class_counts")


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------
def projection_matrix(dim_in: int, dim_out: int, seed: int) -> torch.Tensor:
    """Random projection with orthonormal rows, identical for every party using ``seed``.

    Parameters
    ----------
    dim_in : int
        Feature dimension ``D`` (input of the classifier head).
    dim_out : int
        Descriptor dimension ``K``; must satisfy ``1 <= K <= D``.
    seed : int
        Seed of a CPU ``torch.Generator``; the Gaussian draw is platform independent.

    Returns
    -------
    torch.Tensor
        ``[K, D]`` float32 matrix ``P`` with ``P @ P.T = I_K``.

    Notes
    -----
    ``P`` is the transposed Q factor of a ``[D, K]`` standard Gaussian matrix (computed in float64),
    with the sign of each column fixed so that ``diag(R) > 0``. Without the sign fix the QR
    factorisation is only unique up to column signs, which could differ between LAPACK builds.
    Nothing is fitted on data.
    """
    if not (isinstance(dim_in, int) and isinstance(dim_out, int)):
        raise TypeError("dim_in and dim_out must be int")
    if dim_in < 1 or dim_out < 1:
        raise ValueError(f"dimensions must be >= 1, got dim_in={dim_in}, dim_out={dim_out}")
    if dim_out > dim_in:
        raise ValueError(
            f"dim_out={dim_out} > dim_in={dim_in}: a projection cannot have more orthonormal "
            "rows than the feature dimension"
        )
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    g = torch.randn(dim_in, dim_out, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    q = q * signs  # unique QR: positive diagonal of R
    return q.T.contiguous().to(torch.float32)


# --------------------------------------------------------------------------------------------
# Descriptor container
# --------------------------------------------------------------------------------------------
def _as_f64(x: object) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float64, copy=True)


@state_type
@dataclass
class FluxDescriptor:
    """Moments of one client's projected features.

    Attributes
    ----------
    mu, sigma : np.ndarray
        ``[K]`` float64 marginal mean and (unbiased) standard deviation.
    n : int
        Number of samples the moments were computed from.
    class_mu, class_sigma : np.ndarray or None
        ``[C, K]`` per-class moments; rows of absent classes are zeros and carry no meaning.
        ``None`` for a label-free descriptor.
    class_counts : np.ndarray or None
        ``[C]`` int64 number of samples per class (sums to ``n``); ``None`` when label-free.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    class_mu: np.ndarray | None = None
    class_sigma: np.ndarray | None = None
    class_counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.mu = _as_f64(self.mu).reshape(-1)
        self.sigma = _as_f64(self.sigma).reshape(-1)
        self.n = int(self.n)
        if self.mu.shape != self.sigma.shape:
            raise ValueError(f"mu {self.mu.shape} and sigma {self.sigma.shape} differ in shape")
        parts = (self.class_mu, self.class_sigma, self.class_counts)
        if all(p is None for p in parts):
            return
        if any(p is None for p in parts):
            raise ValueError("class_mu, class_sigma and class_counts must all be given or all None")
        self.class_mu = _as_f64(self.class_mu)
        self.class_sigma = _as_f64(self.class_sigma)
        counts = self.class_counts
        if isinstance(counts, torch.Tensor):
            counts = counts.detach().cpu().numpy()
        self.class_counts = np.array(counts, dtype=np.int64, copy=True).reshape(-1)
        c, k = self.class_counts.shape[0], self.mu.shape[0]
        for name in _CLASS_MOMENT_KEYS:
            if getattr(self, name).shape != (c, k):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {(c, k)}")
        # Absent rows carry no meaning; store them as zeros so equal descriptors compare equal.
        absent = ~self.present
        self.class_mu[absent] = 0.0
        self.class_sigma[absent] = 0.0

    # -- shape helpers -----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Projection dimension ``K``."""
        return int(self.mu.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes ``C`` (0 for a label-free descriptor)."""
        return 0 if self.class_counts is None else int(self.class_counts.shape[0])

    @property
    def is_label_free(self) -> bool:
        """True when the descriptor carries only the marginal moments."""
        return self.class_counts is None

    @property
    def present(self) -> np.ndarray:
        """``[C]`` bool mask of classes with at least 2 samples (the only rows ever used)."""
        if self.class_counts is None:
            raise ValueError("a label-free descriptor has no class statistics")
        return self.class_counts >= 2

    def label_free(self) -> FluxDescriptor:
        """Copy with only the label-free part (marginal ``mu``, ``sigma`` and ``n``)."""
        return FluxDescriptor(mu=self.mu.copy(), sigma=self.sigma.copy(), n=self.n)

    # -- wire format -------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for an ``ArrayRecord``: float32 moments, int64 counts (``n`` has shape [1])."""
        out = {
            "mu": self.mu.astype(np.float32),
            "sigma": self.sigma.astype(np.float32),
            "n": np.array([self.n], dtype=np.int64),
        }
        if not self.is_label_free:
            out["class_mu"] = self.class_mu.astype(np.float32)
            out["class_sigma"] = self.class_sigma.astype(np.float32)
            out["class_counts"] = self.class_counts.astype(np.int64)
        return out

    @classmethod
    def from_arrays(
        cls,
        d: Mapping[str, np.ndarray],
        num_classes: int,
        dim: int,
        label_free: bool,
    ) -> FluxDescriptor:
        """Build a descriptor from untrusted arrays, validating everything.

        Parameters
        ----------
        d : Mapping[str, np.ndarray]
            Exactly the keys of :func:`descriptor_keys` (``label_free``).
        num_classes, dim : int
            Expected ``C`` and ``K``.
        label_free : bool
            Whether a label-free descriptor is expected.

        Raises
        ------
        DescriptorError
            Missing or extra keys, wrong shape, wrong dtype kind (moments must be floating point,
            counts integer), non-finite values, ``|value| > MAX_ABS_VALUE``, negative ``sigma``
            or counts, ``n < 1`` or ``n > MAX_COUNT``, or ``sum(class_counts) != n``.
        """
        if not isinstance(d, Mapping):
            raise DescriptorError(f"expected a mapping of arrays, got {type(d).__name__}")
        expected = set(descriptor_keys(label_free))
        got = set(d.keys())
        if got - expected:
            raise DescriptorError(f"unexpected key(s): {sorted(map(str, got - expected))}")
        if expected - got:
            raise DescriptorError(f"missing key(s): {sorted(expected - got)}")

        def moments(key: str, shape: tuple[int, ...]) -> np.ndarray:
            a = _as_array(d[key], key)
            if a.dtype.kind != "f":
                raise DescriptorError(f"{key}: dtype {a.dtype} is not floating point")
            if a.shape != shape:
                raise DescriptorError(f"{key}: shape {a.shape}, expected {shape}")
            a = a.astype(np.float64)
            if not np.all(np.isfinite(a)):
                raise DescriptorError(f"{key}: non-finite value(s)")
            if np.any(np.abs(a) > MAX_ABS_VALUE):
                raise DescriptorError(f"{key}: |value| > {MAX_ABS_VALUE:g}")
            if key.endswith("sigma") and np.any(a < 0):
                raise DescriptorError(f"{key}: negative standard deviation")
            return a

        def counts(key: str, shapes: tuple[tuple[int, ...], ...]) -> np.ndarray:
            a = _as_array(d[key], key)
            if a.dtype.kind not in "iu":
                raise DescriptorError(f"{key}: dtype {a.dtype} is not integer")
            if a.shape not in shapes:
                raise DescriptorError(f"{key}: shape {a.shape}, expected {shapes[0]}")
            if np.any(a < 0):
                raise DescriptorError(f"{key}: negative count")
            if np.any(a > MAX_COUNT):
                raise DescriptorError(f"{key}: count > {MAX_COUNT}")
            return a.astype(np.int64).reshape(-1)

        if num_classes < 1 and not label_free:
            raise ValueError("num_classes must be >= 1 for a full descriptor")
        mu = moments("mu", (dim,))
        sigma = moments("sigma", (dim,))
        n = int(counts("n", ((1,), ()))[0])
        if n < 1:
            raise DescriptorError("n: a descriptor needs at least one sample")
        if label_free:
            return cls(mu=mu, sigma=sigma, n=n)
        class_mu = moments("class_mu", (num_classes, dim))
        class_sigma = moments("class_sigma", (num_classes, dim))
        class_counts = counts("class_counts", ((num_classes,),))
        total = int(class_counts.sum())
        if total != n:
            raise DescriptorError(f"n={n} inconsistent with sum(class_counts)={total}")
        # Rows of absent classes are ignored (zeroed in __post_init__), whatever was sent.
        return cls(mu, sigma, n, class_mu, class_sigma, class_counts)

    def num_payload_floats(self) -> int:
        """Number of float moments sent: ``2K`` (label-free) or ``2K(C+1)``."""
        return 2 * self.dim * (1 + self.num_classes)

    def num_payload_bytes(self) -> int:
        """Bytes of :meth:`to_arrays` payload data (float32 moments + int64 counts)."""
        return 4 * self.num_payload_floats() + 8 * (1 + self.num_classes)


def _as_array(x: object, key: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise DescriptorError(f"{key}: expected a numpy array, got {type(x).__name__}")
    return x


# --------------------------------------------------------------------------------------------
# Streaming moments
# --------------------------------------------------------------------------------------------
class MomentAccumulator:
    """Streaming float64 moments of ``z`` (marginal and per class); never stores latents.

    Each group keeps (count, mean, centred sum of squares ``M2``); a batch is summarised the
    same way and merged with Chan et al.'s update ``M2 = M2_a + M2_b + delta^2 n_a n_b / n``.
    This is algebraically the sums-and-sums-of-squares estimator but does not cancel
    catastrophically when the mean is large compared with the spread.

    Parameters
    ----------
    num_classes : int
        Number of classes ``C`` (labels must lie in ``[0, C)``).
    dim : int
        Projected dimension ``K``.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        if num_classes < 1 or dim < 1:
            raise ValueError("num_classes and dim must be >= 1")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        f64 = torch.float64
        self.count = torch.zeros(1, dtype=f64)
        self.mean = torch.zeros(1, dim, dtype=f64)
        self.m2 = torch.zeros(1, dim, dtype=f64)
        self.class_count = torch.zeros(num_classes, dtype=f64)
        self.class_mean = torch.zeros(num_classes, dim, dtype=f64)
        self.class_m2 = torch.zeros(num_classes, dim, dtype=f64)
        self.unlabelled = 0  # samples seen without labels (a full descriptor then is invalid)

    @staticmethod
    def _merge(count, mean, m2, cnt_b, mean_b, m2_b):
        total = count + cnt_b
        safe = torch.where(total > 0, total, torch.ones_like(total))
        delta = mean_b - mean
        mean_new = mean + delta * (cnt_b / safe)[:, None]
        m2_new = m2 + m2_b + delta * delta * (count * cnt_b / safe)[:, None]
        return total, mean_new, m2_new

    def update(self, z: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add a batch ``z`` ``[b, K]`` with labels ``y`` ``[b]`` (``None`` = label-free)."""
        z = torch.as_tensor(z).detach().to("cpu", torch.float64)
        z = z.reshape(z.shape[0], -1) if z.ndim != 2 else z
        if z.shape[1] != self.dim:
            raise ValueError(f"z has {z.shape[1]} columns, expected dim={self.dim}")
        b = z.shape[0]
        if b == 0:
            return
        if not torch.isfinite(z).all():
            raise ValueError("non-finite latent values")
        mean_b = z.mean(dim=0, keepdim=True)
        m2_b = ((z - mean_b) ** 2).sum(dim=0, keepdim=True)
        cnt_b = torch.full((1,), float(b), dtype=torch.float64)
        self.count, self.mean, self.m2 = self._merge(
            self.count, self.mean, self.m2, cnt_b, mean_b, m2_b
        )
        if y is None:
            self.unlabelled += b
            return
        y = torch.as_tensor(y).detach().to("cpu").reshape(-1)
        if y.shape[0] != b:
            raise ValueError(f"{y.shape[0]} labels for {b} latents")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got {y.dtype}")
        y = y.long()
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        c, k = self.num_classes, self.dim
        cnt = torch.bincount(y, minlength=c).to(torch.float64)
        sums = torch.zeros(c, k, dtype=torch.float64).index_add_(0, y, z)
        cmean_b = sums / cnt.clamp(min=1.0)[:, None]
        dev = z - cmean_b[y]
        cm2_b = torch.zeros(c, k, dtype=torch.float64).index_add_(0, y, dev * dev)
        self.class_count, self.class_mean, self.class_m2 = self._merge(
            self.class_count, self.class_mean, self.class_m2, cnt, cmean_b, cm2_b
        )

    @staticmethod
    def _std(count: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
        # Unbiased variance; tiny negative values (rounding) are clamped to 0.
        denom = (count - 1.0).clamp(min=1.0)[:, None]
        var = (m2 / denom).clamp(min=0.0)
        var = torch.where((count >= 2.0)[:, None], var, torch.zeros_like(var))
        return var.sqrt()

    def finalize(self, label_free: bool = False) -> FluxDescriptor:
        """Return the descriptor of everything seen so far.

        Parameters
        ----------
        label_free : bool
            Drop the class statistics (required when some batches had no labels).

        Raises
        ------
        ValueError
            No samples were seen, or a full descriptor was requested after label-free batches.
        """
        n = int(self.count.item())
        if n == 0:
            raise ValueError("no samples accumulated")
        mu = self.mean[0].numpy().copy()
        sigma = self._std(self.count, self.m2)[0].numpy().copy()
        if label_free:
            return FluxDescriptor(mu=mu, sigma=sigma, n=n)
        if self.unlabelled:
            raise ValueError(
                f"{self.unlabelled} samples had no labels: only a label-free descriptor is valid"
            )
        counts = self.class_count.round().to(torch.int64).numpy().copy()
        class_mu = self.class_mean.numpy().copy()
        class_sigma = self._std(self.class_count, self.class_m2).numpy().copy()
        return FluxDescriptor(mu, sigma, n, class_mu, class_sigma, counts)


# --------------------------------------------------------------------------------------------
# Client-side computation
# --------------------------------------------------------------------------------------------
#: where the descriptor's features are read (``flux-descriptor-layer``)
DESCRIPTOR_LAYERS = ("head-input", "conv")


def descriptor_features(
    model: torch.nn.Module, layer: str = "head-input"
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """The feature map a descriptor is computed from, and its width.

    ``"head-input"``: the classifier head's input (LeNet-5: the 84-d output of the last FC
    layer). ``"conv"``: the flattened output of the convolutional stack, the encoder's first
    block (LeNet-5: 16 x 5 x 5 = 400-d), the layer the FLUX paper describes; only for encoders
    built as ``Sequential(conv stack, FC layers...)`` (``lenet5``, ``cnn``).
    """
    if layer == "head-input":
        return model.features, int(model.feature_dim)
    if layer != "conv":
        raise ValueError(f"descriptor layer must be one of {DESCRIPTOR_LAYERS}, not {layer!r}")
    encoder = getattr(model, "encoder", None)
    first = encoder[0] if isinstance(encoder, torch.nn.Sequential) and len(encoder) > 1 else None
    after = encoder[1] if first is not None else None
    if (
        not isinstance(first, torch.nn.Sequential)
        or not isinstance(first[-1], torch.nn.Flatten)
        or not isinstance(after, torch.nn.Linear)
    ):
        raise ValueError(
            "flux-descriptor-layer=conv needs an encoder whose first block is a flattened conv "
            f"stack followed by a linear layer (lenet5, cnn); {type(model).__name__} has none"
        )
    return first, int(after.in_features)


def compute_flux_descriptor(
    features: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    projection: torch.Tensor,
    num_classes: int,
    label_free: bool = False,
    clip_norm: float = 0.0,
) -> FluxDescriptor:
    """One pass over the local data: features -> (clip) -> project -> accumulate moments.

    Parameters
    ----------
    features : callable
        Frozen extractor; maps an input batch to features (flattened to ``[b, D]``). It is
        called under ``torch.no_grad``; putting the model in eval mode is the caller's job.
    batches : iterable of (x, y)
        Local data; ``y`` is ignored when ``label_free``.
    projection : torch.Tensor
        ``[K, D]`` matrix from :func:`projection_matrix`; moved to the features' device.
    num_classes : int
        ``C``.
    label_free : bool
        Compute only the marginal part (unseen, unlabeled clients).
    clip_norm : float
        If > 0, every feature vector is rescaled to L2 norm ``<= clip_norm`` before projection
        (needed for :func:`privatize`; ``||P f|| <= ||f||`` because ``P`` has orthonormal rows).

    Returns
    -------
    FluxDescriptor
    """
    acc = accumulate_moments(features, batches, projection, num_classes, label_free, clip_norm)
    return acc.finalize(label_free=label_free)


def accumulate_moments(
    features: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    projection: torch.Tensor,
    num_classes: int,
    label_free: bool = False,
    clip_norm: float = 0.0,
) -> MomentAccumulator:
    """The pass of :func:`compute_flux_descriptor` (features -> clip -> project -> moments),
    returning the accumulator itself (the few-shot class sample reads it unfinalised)."""
    if clip_norm < 0:
        raise ValueError("clip_norm must be >= 0")
    proj = torch.as_tensor(projection)
    acc = MomentAccumulator(num_classes, proj.shape[0])
    proj_cache: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for x, y in batches:
            f = features(x)
            f = f.reshape(f.shape[0], -1).float()
            if f.shape[1] != proj.shape[1]:
                raise ValueError(
                    f"features have dim {f.shape[1]}, projection expects {proj.shape[1]}"
                )
            if clip_norm > 0:
                norms = f.norm(dim=1, keepdim=True)
                f = f * torch.clamp(clip_norm / norms.clamp(min=1e-12), max=1.0)
            key = (f.device, f.dtype)
            if key not in proj_cache:
                proj_cache[key] = proj.to(device=f.device, dtype=f.dtype)
            z = f @ proj_cache[key].T
            acc.update(z, None if label_free else y)
    return acc


# --------------------------------------------------------------------------------------------
# Differential privacy
# --------------------------------------------------------------------------------------------
def _noise(
    shape: tuple[int, ...],
    scale: float,
    mechanism: str,
    generator: torch.Generator | np.random.Generator,
) -> np.ndarray:
    if scale == 0.0:
        return np.zeros(shape)
    if isinstance(generator, np.random.Generator):
        if mechanism == "gaussian":
            return generator.normal(0.0, scale, size=shape)
        return generator.laplace(0.0, scale, size=shape)
    if mechanism == "gaussian":
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).numpy()
    # Laplace by inversion: u ~ U(-1/2, 1/2), x = -b sign(u) log(1 - 2|u|).
    u = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    x = -scale * torch.sign(u) * torch.log1p(-2.0 * u.abs().clamp(max=0.5 - 1e-16))
    return x.numpy()


def moment_sensitivity(clip_norm: float, n: int, dim: int, mechanism: str) -> tuple[float, float]:
    """Sensitivities of one group's released mean and raw second moment (see :func:`privatize`).

    Parameters
    ----------
    clip_norm : float
        ``C``: every projected feature vector has L2 norm ``<= C``.
    n : int
        Samples in the group (public: it is released exactly).
    dim : int
        ``K``, the length of each vector (enters the L1 bound of the mean).
    mechanism : {"gaussian", "laplace"}
        ``gaussian``: L2 sensitivities; ``laplace``: L1 sensitivities.

    Returns
    -------
    tuple of float
        ``(mean, second_moment)``: ``(2C/n, sqrt(2) C^2/n)`` in L2, ``(2 sqrt(K) C/n, 2C^2/n)``
        in L1, under replacement of one of the ``n`` samples.
    """
    c = float(clip_norm)
    if mechanism == "gaussian":
        return 2.0 * c / n, math.sqrt(2.0) * c * c / n
    if mechanism == "laplace":
        return 2.0 * math.sqrt(dim) * c / n, 2.0 * c * c / n
    raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")


def privatize(
    desc: FluxDescriptor,
    clip_norm: float,
    noise_multiplier: float,
    mechanism: str = "gaussian",
    generator: torch.Generator | np.random.Generator | None = None,
) -> FluxDescriptor:
    r"""Noisy copy of a descriptor computed from features clipped to L2 norm ``clip_norm``.

    Privacy unit and neighbouring relation
        One local sample; neighbouring datasets differ by *replacing* one sample's input by any
        other input **with the same label**. Counts ``n`` and ``n_c`` are released exactly (the
        label histogram is treated as public and is NOT protected; noise on counts would break the
        ``sum(n_c) = n`` validation and the presence mask for little gain).

    What is released (and noised)
        For the marginal group (``n`` samples) and each present class (``n_c`` samples) two
        vectors: the mean ``mu = (1/n) sum_i z_i`` and the raw second moment
        ``m2 = (1/n) sum_i z_i**2`` (elementwise); ``m2`` is recovered exactly from the descriptor
        as ``sigma^2 (n-1)/n + mu^2``. After noise, ``sigma = sqrt(max(m2 - mu^2, 0) n/(n-1))``
        (post-processing, so clipped at 0 and free of privacy cost).

    Sensitivities (replace one sample, ``||z|| <= C = clip_norm``)
        Clipping gives ``||f|| <= C`` and ``P`` has orthonormal rows, so ``||z|| = ||P f|| <= C``.

        * mean: ``Delta mu = (z' - z)/n`` so ``||Delta mu||_2 <= 2C/n`` and
          ``||Delta mu||_1 <= sqrt(K) ||Delta mu||_2 <= 2 sqrt(K) C/n``.
        * second moment: ``Delta m2 = (z'**2 - z**2)/n``; ``a = z'**2`` and ``b = z**2`` are
          non-negative with ``sum(a), sum(b) <= C^2``, so ``|a_k - b_k| <= max(a_k, b_k)`` gives
          ``||Delta m2||_1 <= 2C^2/n`` and ``||Delta m2||_2 <= sqrt(2) C^2/n`` (tight: disjoint
          supports). This is ``O(1/n)``; noising ``sigma`` directly would need
          ``||Delta sigma||_2 <= 2C/sqrt(n-1)`` (``O(1/sqrt(n))``, much worse for ``n >> 1``).

    Noise (``m = noise_multiplier``)
        * ``"gaussian"``: per vector, std = ``m * L2 sensitivity``
          (``2mC/n`` on ``mu``, ``sqrt(2) m C^2/n`` on ``m2``).
        * ``"laplace"``: per vector, scale ``b = m * L1 sensitivity``
          (``2 sqrt(K) m C/n`` on ``mu``, ``2 m C^2/n`` on ``m2``): each vector is
          ``(1/m)``-DP.

    Accounting
        One sample touches 4 released vectors (marginal ``mu``, ``m2`` and those of its own class;
        other classes are untouched: parallel composition). Gaussian: each vector is a Gaussian
        mechanism with ``sensitivity/std = 1/m``, so the whole descriptor is ``(2/m)``-Gaussian DP,
        i.e. one Gaussian mechanism with noise multiplier ``m/2`` (``m/sqrt(2)`` label-free).
        Laplace: pure ``epsilon = 4/m`` (``2/m`` label-free).
        Releases compose over a run: :mod:`flux_app.methods.flux.privacy` reports the
        ``(epsilon, delta)`` of all of them (results.json's ``final.privacy``).

    Parameters
    ----------
    desc : FluxDescriptor
        Descriptor computed with ``compute_flux_descriptor(..., clip_norm=clip_norm)``.
    clip_norm : float
        The clipping norm ``C`` (> 0).
    noise_multiplier : float
        ``m >= 0``; 0 returns an exact copy.
    mechanism : {"gaussian", "laplace"}
    generator : torch.Generator or np.random.Generator, optional
        Randomness source (a fresh ``np.random.default_rng()`` if omitted).

    Raises
    ------
    ValueError
        Bad arguments, or moments impossible under the clip (``||mu|| > C`` or
        ``sum(m2) > C^2``): the features were evidently not clipped, the bound would not hold.
    """
    if clip_norm <= 0:
        raise ValueError("clip_norm must be > 0 (the sensitivity bound needs clipped features)")
    if noise_multiplier < 0:
        raise ValueError("noise_multiplier must be >= 0")
    if mechanism not in ("gaussian", "laplace"):
        raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")
    if generator is None:
        generator = np.random.default_rng()
    c = float(clip_norm)
    k = desc.dim
    tol = 1e-4  # float32 round trips of the moments

    def second_moment(mu: np.ndarray, sigma: np.ndarray, n: int) -> np.ndarray:
        return sigma**2 * ((n - 1) / n) + mu**2

    def check(mu: np.ndarray, m2: np.ndarray, what: str) -> None:
        if np.linalg.norm(mu) > c * (1 + tol) or m2.sum() > c * c * (1 + tol):
            raise ValueError(
                f"{what} moments exceed clip_norm={c:g}: the features were not clipped to it, "
                "so the sensitivity bound does not hold"
            )

    def noisy(mu: np.ndarray, sigma: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        m2 = second_moment(mu, sigma, n)
        s_mu, s_m2 = moment_sensitivity(c, n, k, mechanism)
        m = float(noise_multiplier)
        mu_n = mu + _noise(mu.shape, m * s_mu, mechanism, generator)
        m2_n = m2 + _noise(m2.shape, m * s_m2, mechanism, generator)
        if n < 2:
            return mu_n, np.zeros_like(sigma)
        var = np.maximum(m2_n - mu_n**2, 0.0) * (n / (n - 1))
        return mu_n, np.sqrt(var)

    check(desc.mu, second_moment(desc.mu, desc.sigma, desc.n), "marginal")
    mu, sigma = noisy(desc.mu, desc.sigma, desc.n)
    if desc.is_label_free:
        return FluxDescriptor(mu=mu, sigma=sigma, n=desc.n)
    class_mu = np.zeros_like(desc.class_mu)
    class_sigma = np.zeros_like(desc.class_sigma)
    for ci in np.flatnonzero(desc.present):
        n_c = int(desc.class_counts[ci])
        check(
            desc.class_mu[ci],
            second_moment(desc.class_mu[ci], desc.class_sigma[ci], n_c),
            f"class {ci}",
        )
        class_mu[ci], class_sigma[ci] = noisy(desc.class_mu[ci], desc.class_sigma[ci], n_c)
    return FluxDescriptor(mu, sigma, desc.n, class_mu, class_sigma, desc.class_counts.copy())
