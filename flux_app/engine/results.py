"""A run's outputs: ``<output-dir>/<run-name>/`` with run_config.json, results.json (rewritten
atomically after every round, so an interrupted run keeps what it did), per-cluster checkpoints
and a plot of accuracy per round."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch

from flux_app.engine.config import RunConfig

#: keys of results.json's ``final`` that every run has, null unless a method fills them in its
#: ``final_metrics`` (e.g. ``accuracy_routed``: the training nodes' test data routed as newcomers,
#: FLUX's "test phase"), so tables can read any run the same way
FINAL_DEFAULTS: dict[str, Any] = {"accuracy_routed": None}


def default_run_name(cfg: RunConfig) -> str:
    """``<strategy>-<dataset>-<shift>-L<level>-s<seed>-<UTC time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{cfg.strategy}-{cfg.dataset}-{cfg.shift}-L{cfg.level}-s{cfg.seed}-{stamp}"


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> null, numpy/torch scalars -> Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, data: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(_clean(data), fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


class RunRecorder:
    """Collects a run's rounds, clustering and final metrics and writes them to disk.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration (written to run_config.json and into results.json).
    root : str, optional
        Folder of this run; default ``<output-dir>/<run-name or default_run_name>``.
    """

    def __init__(self, cfg: RunConfig, root: str | None = None) -> None:
        self.cfg = cfg
        name = cfg.run_name or default_run_name(cfg)
        if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name):
            raise ValueError(f"run-name {name!r} may hold only letters, digits and . _ + = -")
        self.root = root or os.path.join(cfg.resolved_output_dir, name)
        os.makedirs(self.root, exist_ok=True)
        self.data: dict[str, Any] = {
            "run_config": cfg.to_dict(),
            "rounds": [],
            "clustering": None,
            "final": None,
        }
        if cfg.resume_from and os.path.isfile(self.results_path):
            # a resumed run keeps what its folder holds until the checkpoint is restored
            with open(self.results_path) as fh:
                kept = json.load(fh)
            self.data.update({k: v for k, v in kept.items() if k != "run_config"})
            self.data["final"] = None
        write_json(os.path.join(self.root, "run_config.json"), cfg.to_dict())
        self.flush()

    @property
    def results_path(self) -> str:
        """Path of results.json."""
        return os.path.join(self.root, "results.json")

    def add_round(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics and rewrite results.json."""
        self.data["rounds"].append(dict(row))
        self.flush()

    def set(self, key: str, value: Any) -> None:
        """Set a top-level section (``clustering``, ``final``, or a method's own) and flush."""
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        """Rewrite results.json from memory."""
        write_json(self.results_path, self.data)

    def save_checkpoints(self, models: Mapping[int, Mapping[str, torch.Tensor]]) -> list[str]:
        """``checkpoints/cluster_<id>.pt`` per cluster (plain state dicts, loadable with
        ``torch.load(path, weights_only=True)``)."""
        folder = os.path.join(self.root, "checkpoints")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for cid, state in sorted(models.items()):
            path = os.path.join(folder, f"cluster_{cid}.pt")
            torch.save({k: v.detach().cpu() for k, v in state.items()}, path)
            paths.append(path)
        return paths

    def plot(self) -> str | None:
        """accuracy.png: test accuracy (mean over clients) and cluster count per round."""
        rows = [r for r in self.data["rounds"] if r.get("accuracy") is not None]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(
            [r["round"] for r in rows], [r["accuracy"] for r in rows], marker="o", label="accuracy"
        )
        ax.set_xlabel("round")
        ax.set_ylabel("mean client test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.step(
            [r["round"] for r in rows],
            [r.get("num_clusters", 1) for r in rows],
            where="post",
            color="tab:orange",
            alpha=0.6,
            label="clusters",
        )
        ax2.set_ylabel("clusters")
        cfg = self.cfg
        ax.set_title(
            f"{cfg.strategy} on {cfg.dataset}, shift {cfg.shift} L{cfg.level}, seed {cfg.seed}"
        )
        fig.tight_layout()
        path = os.path.join(self.root, "accuracy.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
