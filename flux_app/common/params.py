"""Parameter arithmetic on state dicts (CPU tensors): averaging, copying, flattening."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch

State = OrderedDict  # str -> torch.Tensor (CPU)


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> OrderedDict[str, torch.Tensor]:
    """Sample-weighted mean of state dicts (FedAvg).

    Floating tensors are averaged in float64 then cast back; integer buffers (e.g. BatchNorm's
    ``num_batches_tracked``) take the maximum, which is what a counter means after averaging.
    """
    if not states:
        raise ValueError("nothing to average")
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if not bool((w >= 0).all()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    w = w / w.sum()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros(first.shape, dtype=torch.float64)
            for wi, s in zip(w, states, strict=True):
                acc += wi * s[key].to(torch.float64)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.stack([s[key] for s in states]).max(dim=0).values
    return out


def clone_state(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Deep copy of a state dict on CPU."""
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items())


def flat_params(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """float64 ``[m]``: every floating tensor of a state dict, flattened in state order."""
    parts = [
        v.detach().reshape(-1).double().numpy() for v in state.values() if v.is_floating_point()
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def update_length(sent: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``trained - sent`` over ``trained``'s floating tensors (float64); a key that
    ``sent`` lacks counts as zero there (``update_length({}, state)`` is the model's length)."""
    total = 0.0
    for key, value in trained.items():
        if value.is_floating_point():
            ref = sent.get(key)
            diff = value.double() if ref is None else value.double() - ref.double()
            total += float((diff**2).sum())
    return total**0.5


__all__ = ["State", "clone_state", "flat_params", "update_length", "weighted_average"]
