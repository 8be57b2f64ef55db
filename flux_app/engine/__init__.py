"""The engine every method runs on: registries, run-config, the strategy base and its round
loop, nodes, transport, traffic, aggregation inside clusters, metrics, results, the generic
client handlers and the in-process grid.

The public API for method authors::

    from flux_app.engine import (
        ClusteredStrategy, ConfigSection, Reply, register_config, register_query,
        register_strategy, register_train_hook, register_aggregator,
    )

Importing this package is cheap: the submodules load when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClusteredStrategy": "flux_app.engine.strategy",
    "Reply": "flux_app.engine.strategy",
    "NodeInfo": "flux_app.engine.nodes",
    "ConfigSection": "flux_app.engine.config",
    "ConfigError": "flux_app.engine.config",
    "RunConfig": "flux_app.engine.config",
    "ClientRuntime": "flux_app.engine.client",
    "config_of": "flux_app.engine.client",
    "register_strategy": "flux_app.engine.registry",
    "register_query": "flux_app.engine.registry",
    "register_config": "flux_app.engine.registry",
    "register_train_hook": "flux_app.engine.registry",
    "register_aggregator": "flux_app.engine.registry",
    "build_strategy": "flux_app.engine.server",
    "run_server": "flux_app.engine.server",
    "route_by_loss": "flux_app.engine.routing",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flux_app.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
