"""Strategies: one base (:mod:`flux_app.strategies.base`) and one module per method."""

from __future__ import annotations

from flux_app.config import RunConfig
from flux_app.results import RunRecorder
from flux_app.strategies.base import ClusteredStrategy, NodeInfo, Reply
from flux_app.strategies.cfl import Cfl
from flux_app.strategies.fedavg import FedAvg
from flux_app.strategies.feddag import FedDag
from flux_app.strategies.fesem import Fesem
from flux_app.strategies.flux import Flux
from flux_app.strategies.ifca import Ifca
from flux_app.strategies.kmeans_flux import KMeansFlux
from flux_app.strategies.local import Local
from flux_app.strategies.oracle import Oracle
from flux_app.strategies.pacfl import Pacfl

#: run-config ``strategy`` -> class. Methods register here.
STRATEGIES: dict[str, type[ClusteredStrategy]] = {
    FedAvg.name: FedAvg,
    Local.name: Local,
    Oracle.name: Oracle,
    Flux.name: Flux,
    KMeansFlux.name: KMeansFlux,  # the docs/EXTENDING.md example
    FedDag.name: FedDag,
    Ifca.name: Ifca,
    Cfl.name: Cfl,
    Pacfl.name: Pacfl,
    Fesem.name: Fesem,
}


def build_strategy(cfg: RunConfig, recorder: RunRecorder | None = None) -> ClusteredStrategy:
    """The strategy named by ``cfg.strategy``."""
    try:
        cls = STRATEGIES[cfg.strategy]
    except KeyError:
        raise ValueError(
            f"strategy {cfg.strategy!r} is not available; available: {', '.join(sorted(STRATEGIES))}"
        ) from None
    return cls(cfg, recorder)


__all__ = ["STRATEGIES", "ClusteredStrategy", "NodeInfo", "Reply", "build_strategy"]
