"""FedAvg: one global model, sample-weighted averaging (the base class's defaults)."""

from __future__ import annotations

from flux_app.engine.registry import register_strategy
from flux_app.engine.strategy import ClusteredStrategy


@register_strategy("fedavg")
class FedAvg(ClusteredStrategy):
    """One cluster holding every training node; the base's per-cluster FedAvg does the rest."""
