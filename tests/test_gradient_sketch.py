"""Shared-seed gradient sketches and angle distances."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from flux_app.methods.feddag.sketch import (
    angle_distance_matrix,
    flatten_update,
    sketch,
    sketch_indices,
)


def test_same_seed_same_mask() -> None:
    a = sketch_indices(100_000, 0.02, seed=4321)
    b = sketch_indices(100_000, 0.02, seed=4321)
    c = sketch_indices(100_000, 0.02, seed=4322)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int64 and a.size == 2000
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 100_000
    assert sketch_indices(10, 0.001, seed=0).size == 1  # at least one coordinate
    assert sketch_indices(10, 1.0, seed=0).tolist() == list(range(10))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            sketch_indices(10, bad, seed=0)


def test_flatten_update_float_only_sorted_keys() -> None:
    old = OrderedDict(
        b=torch.zeros(2, 2),
        a=torch.ones(3),
        n=torch.tensor(5, dtype=torch.int64),  # e.g. num_batches_tracked: skipped
    )
    new = OrderedDict(
        b=torch.full((2, 2), 2.0),
        a=torch.tensor([1.0, 2.0, 4.0]),
        n=torch.tensor(9, dtype=torch.int64),
    )
    flat = flatten_update(new, old)
    assert flat.dtype == np.float32
    np.testing.assert_allclose(flat, [0, 1, 3, 2, 2, 2, 2])  # a before b
    reordered = OrderedDict((k, new[k]) for k in ("n", "b", "a"))
    np.testing.assert_array_equal(flatten_update(reordered, old), flat)
    as_numpy = {k: v.numpy() for k, v in new.items()}
    np.testing.assert_array_equal(flatten_update(as_numpy, old), flat)
    with pytest.raises(ValueError):
        flatten_update({"a": torch.ones(3)}, old)
    with pytest.raises(ValueError):
        flatten_update({**new, "a": torch.ones(4)}, old)


def test_sketch_picks_coordinates() -> None:
    u = np.arange(10, dtype=np.float64)
    np.testing.assert_array_equal(sketch(u, np.array([1, 4, 9])), [1, 4, 9])
    with pytest.raises(ValueError):
        sketch(u, np.array([10]))


def test_angles() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal(50)
    w = rng.standard_normal(50)
    w -= (w @ v) / (v @ v) * v  # orthogonal to v
    s = np.stack([v, -v, 2 * v, w, np.zeros(50)])
    ang = angle_distance_matrix(s)
    assert ang[0, 1] == pytest.approx(180.0)
    assert ang[0, 2] == pytest.approx(0.0, abs=1e-5)
    assert ang[0, 3] == pytest.approx(90.0)
    assert ang[1, 3] == pytest.approx(90.0)
    assert np.all(ang[4, :4] == 90.0)  # zero sketch: no direction, no NaN
    assert np.all(np.diag(ang) == 0.0)
    np.testing.assert_allclose(ang, ang.T)
    assert np.all(np.isfinite(ang))
    x = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert angle_distance_matrix(x)[0, 1] == pytest.approx(45.0)
    with pytest.raises(ValueError):
        angle_distance_matrix(np.array([[np.nan, 1.0], [1.0, 1.0]]))
