"""FedDAG's dual-encoder arithmetic: building a cluster's dual model and moving secondary
encoders by the complementary clusters' deltas. Pure functions of state dicts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from flux_app.common.params import State, weighted_average

SECONDARY = "secondary."


def dual_cluster_model(warm_mean: State, fresh: Mapping[str, object]) -> State:
    """Primary encoder = the members' warm-up encoder mean; secondary and head from ``fresh``
    (a seeded dual model's state dict)."""
    out: State = OrderedDict()
    for k, v in fresh.items():
        if k.startswith("primary."):
            out[k] = warm_mean["encoder." + k[len("primary.") :]].clone()
        else:
            out[k] = v.detach().clone()  # type: ignore[attr-defined]
    return out


def secondary_parts(models: Mapping[int, State]) -> dict[int, State]:
    """Each cluster's secondary-encoder tensors."""
    return {
        z: OrderedDict((k, v) for k, v in s.items() if k.startswith(SECONDARY))
        for z, s in models.items()
    }


def source_model(source: State, learners_secondary: Sequence[State]) -> State:
    """What a source cluster's nodes train: its own model with the mean of its learners'
    secondary encoders in place of its secondary."""
    phi2 = weighted_average(list(learners_secondary), [1.0] * len(learners_secondary))
    return OrderedDict((k, phi2.get(k, v)) for k, v in source.items())


def secondary_delta(trained: State, sent: State, keys: Sequence[str]) -> State:
    """float64 ``trained - sent`` over the secondary keys that are floating point."""
    return OrderedDict(
        (k, trained[k].double() - sent[k].double()) for k in keys if trained[k].is_floating_point()
    )


def add_delta(model: State, delta: Mapping[str, object]) -> None:
    """``model += delta`` in place, in float64, keeping the model's dtypes."""
    for k, dv in delta.items():
        model[k] = (model[k].double() + dv).to(model[k].dtype)


__all__ = ["add_delta", "dual_cluster_model", "secondary_delta", "secondary_parts", "source_model"]
