"""FedAvg: one global model, sample-weighted averaging (the base class's defaults)."""

from __future__ import annotations

from flux_app.strategies.base import ClusteredStrategy


class FedAvg(ClusteredStrategy):
    """One cluster holding every training node; the base's per-cluster FedAvg does the rest."""

    name = "fedavg"
