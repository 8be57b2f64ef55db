"""Typed view of the run-config.

Every tunable of a run is a kebab-case key in ``[tool.flwr.app.config]`` of pyproject.toml
(Flower's convention; override with ``flwr run . -c 'key=value'``). :class:`RunConfig` mirrors
those keys as snake_case fields, validates them once, and resolves the ``"auto"`` values that
depend on the dataset (learning rate, local epochs, model). A test keeps the defaults here and
in pyproject.toml identical.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

STRATEGIES = (
    "fedavg",
    "local",
    "oracle",
    "flux",
    "feddag",
    "ifca",
    "cfl",
    "pacfl",
    "fesem",
    "kmeans-flux",
)
DATASETS = ("digits", "fmnist", "mnist", "cifar10", "cifar100", "synthetic")
SHIFTS = ("none", "px", "py", "pyx", "pxy", "label-skew", "concept", "dirichlet")
MODELS = ("lenet5", "cnn", "resnet9")
DEVICES = ("auto", "cpu", "cuda")

# Per-dataset values used where the run-config says "auto". digits has ~120 samples per client
# at 12 clients: the FLUX protocol's lr 0.005 / 2 epochs leaves LeNet-5 at chance there, and
# lr 0.05 with momentum 0.9 (an effective step of 0.5) leaves some 4-client cluster models stuck
# near chance for good (Oracle, px level 2, seed 1: one cluster at 3-10 % after 8 rounds), while
# momentum 0.5 trains every cluster (docs/DECISIONS.md).
DATASET_PROFILES: dict[str, dict[str, Any]] = {
    "digits": {"lr": 0.05, "momentum": 0.5, "local_epochs": 10, "model": "lenet5"},
    "synthetic": {"lr": 0.05, "momentum": 0.9, "local_epochs": 2, "model": "lenet5"},
    "fmnist": {"lr": 0.005, "momentum": 0.9, "local_epochs": 2, "model": "lenet5"},
    "mnist": {"lr": 0.005, "momentum": 0.9, "local_epochs": 2, "model": "lenet5"},
    "cifar10": {"lr": 0.005, "momentum": 0.9, "local_epochs": 2, "model": "lenet5"},
    "cifar100": {"lr": 0.005, "momentum": 0.9, "local_epochs": 2, "model": "lenet5"},
}


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """All run-config keys of the app, snake_case, with the defaults of pyproject.toml."""

    strategy: str = "fedavg"
    dataset: str = "digits"
    data_root: str = ""
    shift: str = "px"
    level: int = 2
    alpha: float = 0.5
    rho: float = 0.2
    holdout_clients: int = 0
    num_server_rounds: int = 5
    local_epochs: int | str = "auto"
    lr: float | str = "auto"
    momentum: float | str = "auto"
    weight_decay: float = 0.0
    batch_size: int = 64
    val_fraction: float = 0.2
    fraction_train: float = 1.0
    model: str = "auto"
    seed: int = 0
    device: str = "auto"
    output_dir: str = ""
    run_name: str = ""
    eval_every: int = 1
    round_timeout: float = 600.0
    min_nodes: int = 0
    # FLUX
    cluster_round: int = 0
    cluster_gain_threshold: float = 0.06
    cluster_min_round: int = 3
    cluster_max_fraction: float = 0.8
    flux_clusterer: str = "hdbscan"
    flux_proj_dim: int = 0
    flux_proj_seed: int = 1234
    flux_min_cluster_size: int = 2
    flux_noise_policy: str = "attach"
    flux_attach_tolerance: float = 2.0
    flux_iid_guard: bool = True
    flux_missing_penalty: float = 1.0
    flux_dp_clip: float = 0.0
    flux_dp_noise: float = 0.0
    flux_dp_mechanism: str = "gaussian"
    # FedDAG
    feddag_warmup_rounds: int = 2
    feddag_warmup_epochs: int = 10
    feddag_sketch_fraction: float = 0.02
    feddag_sketch_seed: int = 4321
    feddag_subspace_dim: int = 3
    feddag_similarity: str = "fused"
    feddag_delta: float = 0.5
    feddag_lambda: float = 0.01
    feddag_alpha_step: float = 0.05
    feddag_top_k: int = 2
    feddag_variant: str = "dual"
    feddag_schedule_k: int = 0
    # Peers
    num_clusters: int = 3
    cfl_eps1: float = 0.4
    cfl_eps2: float = 1.6
    cfl_min_round: int = 20
    pacfl_threshold: float = 0.0
    pacfl_subspace_dim: int = 3

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, strict: bool = True) -> RunConfig:
        """Build from a Flower run-config (kebab-case keys).

        Parameters
        ----------
        values : Mapping[str, Any]
            ``context.run_config`` or any dict with kebab-case (or snake_case) keys.
        strict : bool
            Reject keys this app does not know (a typo would otherwise be ignored silently).
        """
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                if strict:
                    raise ConfigError(
                        f"unknown run-config key {key!r}; known keys: "
                        + ", ".join(sorted(n.replace("_", "-") for n in known))
                    )
                continue
            kwargs[name] = _coerce(
                key, value, known[name].default, numeric=name in _NUMERIC_OR_AUTO
            )
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> RunConfig:
        """Copy with some fields changed (snake_case names), validated."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict, as written to run_config.json and accepted by ``from_mapping``."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad key."""
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("dataset", self.dataset, DATASETS)
        _choice("shift", self.shift, SHIFTS)
        _choice("device", self.device, DEVICES)
        if self.model != "auto":
            _choice("model", self.model, MODELS)
        _choice("flux-clusterer", self.flux_clusterer, ("hdbscan", "knee-dbscan"))
        _choice("flux-noise-policy", self.flux_noise_policy, ("attach", "singleton"))
        _choice("flux-dp-mechanism", self.flux_dp_mechanism, ("gaussian", "laplace"))
        _choice("feddag-similarity", self.feddag_similarity, ("fused", "data", "gradient"))
        _choice("feddag-variant", self.feddag_variant, ("dual", "single", "dagger"))
        _check(1 <= self.level <= 8, "level", self.level, "an integer in 1..8")
        _check(self.alpha > 0, "alpha", self.alpha, "> 0")
        _check(0 < self.rho <= 1, "rho", self.rho, "in (0, 1]")
        _check(self.holdout_clients >= 0, "holdout-clients", self.holdout_clients, ">= 0")
        _check(self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds, ">= 1")
        _check(self.batch_size >= 1, "batch-size", self.batch_size, ">= 1")
        _check(0 <= self.val_fraction < 1, "val-fraction", self.val_fraction, "in [0, 1)")
        _check(0 < self.fraction_train <= 1, "fraction-train", self.fraction_train, "in (0, 1]")
        _check(self.eval_every >= 1, "eval-every", self.eval_every, ">= 1")
        _check(self.round_timeout > 0, "round-timeout", self.round_timeout, "> 0")
        if self.momentum != "auto":
            _check(float(self.momentum) >= 0, "momentum", self.momentum, '>= 0 or "auto"')
        _check(self.weight_decay >= 0, "weight-decay", self.weight_decay, ">= 0")
        _check(self.num_clusters >= 1, "num-clusters", self.num_clusters, ">= 1")
        _check(self.cluster_round >= 0, "cluster-round", self.cluster_round, ">= 0 (0 = automatic)")
        _check(
            0 < self.feddag_sketch_fraction <= 1,
            "feddag-sketch-fraction",
            self.feddag_sketch_fraction,
            "in (0, 1]",
        )
        _check(self.flux_dp_clip >= 0, "flux-dp-clip", self.flux_dp_clip, ">= 0")
        _check(self.flux_dp_noise >= 0, "flux-dp-noise", self.flux_dp_noise, ">= 0")
        _check(
            not (self.flux_dp_noise > 0 and self.flux_dp_clip <= 0),
            "flux-dp-noise",
            self.flux_dp_noise,
            "0 unless flux-dp-clip > 0 (the noise scale is calibrated to the clip norm)",
        )
        if self.lr != "auto":
            _check(float(self.lr) > 0, "lr", self.lr, '> 0 or "auto"')
        if self.local_epochs != "auto":
            _check(int(self.local_epochs) >= 1, "local-epochs", self.local_epochs, '>= 1 or "auto"')

    # ------------------------------------------------------------------ resolved values
    @property
    def learning_rate(self) -> float:
        """``lr``, or the dataset's default when ``lr = "auto"``."""
        return float(DATASET_PROFILES[self.dataset]["lr"] if self.lr == "auto" else self.lr)

    @property
    def sgd_momentum(self) -> float:
        """``momentum``, or the dataset's default when ``momentum = "auto"``."""
        if self.momentum == "auto":
            return float(DATASET_PROFILES[self.dataset]["momentum"])
        return float(self.momentum)

    @property
    def epochs(self) -> int:
        """``local-epochs``, or the dataset's default when ``"auto"``."""
        if self.local_epochs == "auto":
            return int(DATASET_PROFILES[self.dataset]["local_epochs"])
        return int(self.local_epochs)

    @property
    def model_name(self) -> str:
        """``model``, or the dataset's default when ``"auto"``."""
        return str(DATASET_PROFILES[self.dataset]["model"] if self.model == "auto" else self.model)

    @property
    def resolved_output_dir(self) -> str:
        """Absolute output folder: ``output-dir``, else $FLUX_APP_OUTPUT_DIR, else ./outputs.

        The ServerApp runs in the SuperLink's working directory, so the scripts pass an
        absolute ``output-dir``; a relative one is resolved here once, explicitly.
        """
        out = self.output_dir or os.environ.get("FLUX_APP_OUTPUT_DIR", "") or "outputs"
        return os.path.abspath(os.path.expanduser(out))


_NUMERIC_OR_AUTO = ("lr", "local_epochs", "momentum")


def _coerce(key: str, value: Any, default: Any, *, numeric: bool = False) -> Any:
    """Convert a run-config value to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if numeric:  # a number or "auto"
            if isinstance(value, str):
                return "auto" if value == "auto" else float(value)
            return value
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"run-config key {key!r} has value {value!r}; expected {type(default).__name__}"
        ) from None


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"run-config key {key!r} is {value!r}; choose one of {', '.join(allowed)}"
        )


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"run-config key {key!r} is {value!r}; expected {expected}")
