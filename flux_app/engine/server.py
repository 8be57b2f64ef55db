"""Server side of a run, shared by the ServerApp and the in-process runner."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.serverapp import Grid

from flux_app.engine.checkpoint import resume_folder
from flux_app.engine.config import RunConfig
from flux_app.engine.registry import strategy_class
from flux_app.engine.results import RunRecorder
from flux_app.engine.strategy import ClusteredStrategy

logger = logging.getLogger("flwr")


def build_strategy(cfg: RunConfig, recorder: RunRecorder | None = None) -> ClusteredStrategy:
    """The registered strategy named by ``cfg.strategy`` (built-in or from a plug-in)."""
    return strategy_class(cfg.strategy)(cfg, recorder)


def run_server(grid: Grid, run_config: Mapping[str, Any] | RunConfig) -> tuple[dict[str, Any], str]:
    """Build the configured strategy, run it on ``grid`` and write its outputs.

    Returns
    -------
    results : dict
        The content of results.json.
    run_dir : str
        The run's output folder.
    """
    cfg = run_config if isinstance(run_config, RunConfig) else RunConfig.from_mapping(run_config)
    recorder = RunRecorder(cfg, resume_folder(cfg) if cfg.resume_from else None)
    logger.info(
        "flux-app: strategy=%s dataset=%s shift=%s level=%d -> %s",
        cfg.strategy,
        cfg.dataset,
        cfg.shift,
        cfg.level,
        recorder.root,
    )
    strategy = build_strategy(cfg, recorder)
    results = strategy.start(grid)
    return recorder.data | {"final": results["final"]}, recorder.root


__all__ = ["build_strategy", "run_server"]
