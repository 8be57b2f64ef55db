"""Gradient sketches for FedDAG: a model update restricted to a shared random set of coordinates.

Every party derives the same coordinate mask from a shared seed, so the server can compare the
clients' sketches coordinate by coordinate without ever seeing whole updates. The angle between
two sketches estimates the angle between the full updates (a random coordinate subset keeps inner
products unbiased up to a common scale).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["angle_distance_matrix", "flatten_update", "sketch", "sketch_indices"]


def sketch_indices(num_params: int, fraction: float, seed: int) -> np.ndarray:
    """The shared coordinate mask.

    Parameters
    ----------
    num_params : int
        Length of the flattened update.
    fraction : float
        Share of coordinates kept, in ``(0, 1]``; ``max(1, round(fraction * num_params))`` are kept.
    seed : int
        Seed shared by all parties.

    Returns
    -------
    np.ndarray
        Sorted, distinct int64 indices. Identical for every caller with the same arguments and
        the same numpy version (``numpy.random.Generator`` with PCG64).
    """
    if num_params < 1:
        raise ValueError("num_params must be >= 1")
    if not 0.0 < fraction <= 1.0:
        raise ValueError("fraction must be in (0, 1]")
    k = min(num_params, max(1, round(fraction * num_params)))
    rng = np.random.default_rng(seed)
    idx = rng.choice(num_params, size=k, replace=False)
    return np.sort(idx).astype(np.int64)


def _float_array(value: torch.Tensor | np.ndarray) -> np.ndarray | None:
    """A float tensor/array as float64 numpy, or None for non-float entries (buffers, counters)."""
    if isinstance(value, torch.Tensor):
        if not torch.is_floating_point(value):
            return None
        return value.detach().cpu().to(torch.float64).numpy().reshape(-1)
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating):
        return None
    return arr.astype(np.float64).reshape(-1)


def flatten_update(
    new_state: Mapping[str, torch.Tensor | np.ndarray],
    old_state: Mapping[str, torch.Tensor | np.ndarray],
) -> np.ndarray:
    """``new - old`` over all floating-point entries, flattened, float32 ``[num_params]``.

    Keys are taken in sorted order so that the layout does not depend on dict order; integer
    entries (e.g. BatchNorm's ``num_batches_tracked``) are skipped.

    Raises
    ------
    ValueError
        When the two states have different keys or shapes.
    """
    if set(new_state) != set(old_state):
        raise ValueError("state dicts have different keys")
    parts = []
    for key in sorted(new_state):
        if tuple(new_state[key].shape) != tuple(old_state[key].shape):
            raise ValueError(f"shape mismatch for {key!r}")
        new, old = _float_array(new_state[key]), _float_array(old_state[key])
        if (new is None) != (old is None):
            raise ValueError(f"dtype mismatch for {key!r}")
        if new is not None:
            parts.append(new - old)
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32)


def sketch(update_flat: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The update at the shared coordinates, float32 ``[len(indices)]``."""
    update_flat = np.asarray(update_flat).reshape(-1)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= update_flat.size):
        raise ValueError("sketch indices out of range for this update")
    return update_flat[indices].astype(np.float32)


def angle_distance_matrix(sketches: np.ndarray) -> np.ndarray:
    """Pairwise angles between sketches, float64 ``[n, n]`` in degrees in ``[0, 180]``.

    The diagonal is 0. A zero sketch has no direction: its angle to every other sketch is 90
    (cosine 0), so it never looks similar to anyone, and no NaN appears.
    """
    s = np.asarray(sketches, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError("sketches must be [n, m]")
    if not np.all(np.isfinite(s)):
        raise ValueError("sketches contain non-finite values")
    norms = np.linalg.norm(s, axis=1)
    unit = np.divide(s, norms[:, None], out=np.zeros_like(s), where=norms[:, None] > 0)
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    ang = np.degrees(np.arccos(cos))
    ang = 0.5 * (ang + ang.T)
    np.fill_diagonal(ang, 0.0)
    return ang
