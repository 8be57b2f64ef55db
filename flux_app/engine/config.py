"""Typed view of the run-config: a small common part and one section per method.

Every tunable of a run is a kebab-case key in ``[tool.flwr.app.config]`` of pyproject.toml
(Flower's convention; override with ``flwr run . -c 'key=value'``). :class:`RunConfig` holds the
keys every run has (data, training, rounds, outputs) as snake_case fields and resolves the
``"auto"`` values that depend on the dataset. A method's own keys share a prefix (``flux-*``,
``feddag-*``, ...) and live in its :class:`ConfigSection`, a frozen dataclass that the method
registers (``@register_config``) and validates itself; ``cfg.section(FluxConfig)`` returns it.

Plug-ins (run-config ``plugins``) register sections the same way. Flower accepts only keys the
app's pyproject declares, so a plug-in's keys travel inside ``plugin-config`` (``"k=v k2=v2"``)
and are parsed and validated exactly like built-in ones. Renamed keys keep working for one
release with a deprecation warning (``ConfigSection.renamed``). A test keeps the defaults here
and in pyproject.toml identical.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import tomllib

from flux_app.engine import registry

logger = logging.getLogger("flwr")
DATASETS = ("digits", "fmnist", "mnist", "cifar10", "cifar100", "synthetic")
# flux_app.data.shifts.SHIFTS, copied so that reading a run-config imports no torch
# (tests/test_sites.py checks the two lists are equal)
SHIFTS = (
    "none",
    "px",
    "py",
    "pyx",
    "pxy",
    "label-skew",
    "concept",
    "dirichlet",
    "dirichlet-groups",
)
MODELS = ("lenet5", "cnn", "resnet9")
DEVICES = ("auto", "cpu", "cuda")

# Per-dataset values used where the run-config says "auto". digits has ~120 samples per client
# at 12 clients: the FLUX protocol's lr 0.005 / 2 epochs leaves LeNet-5 at chance there, and
# lr 0.05 with momentum 0.9 (an effective step of 0.5) leaves some 4-client cluster models stuck
# near chance for good (Oracle, px level 2, seed 1: one cluster at 3-10 % after 8 rounds), while
# momentum 0.5 trains every cluster (docs/DECISIONS.md).
#: ``(channels, image size, classes)`` of the known datasets: the defaults of run-config
#: ``channels``, ``image-size`` and ``num-classes`` (the model's shape never comes from loading a
#: dataset on the server, nor from a node's word)
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 28, 10),
    "synthetic": (1, 28, 10),
    "fmnist": (1, 28, 10),
    "mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
}

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


S = TypeVar("S", bound="ConfigSection")


@dataclass(frozen=True)
class ConfigSection:
    """Base of a method's run-config section: a frozen dataclass whose field ``foo_bar`` is
    the key ``<prefix>foo-bar`` (a trailing underscore is dropped: ``lambda_`` -> ``lambda``).

    Subclasses set ``prefix`` (e.g. ``"flux-"``), optionally ``renamed`` (deprecated key ->
    current key) and override :meth:`validate`, raising through :meth:`check` / :meth:`choice`
    so errors name the key.
    """

    prefix: ClassVar[str] = ""
    #: registry name (default: the prefix without its dash)
    section: ClassVar[str] = ""
    #: deprecated key -> current key; the old name still works, with a warning
    renamed: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def name(cls) -> str:
        """The section's registry name."""
        return cls.section or cls.prefix.rstrip("-")

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Run-config key -> field name."""
        return {cls.prefix + f.name.rstrip("_").replace("_", "-"): f.name for f in fields(cls)}

    def key(self, field_name: str) -> str:
        """The run-config key of one field."""
        return self.prefix + field_name.rstrip("_").replace("_", "-")

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case keys with this section's values."""
        return {k: getattr(self, f) for k, f in self.keys().items()}

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad key (override)."""

    def check(self, ok: bool, field_name: str, expected: str) -> None:
        """Raise :class:`ConfigError` for ``field_name`` unless ``ok``."""
        _check(ok, self.key(field_name), getattr(self, field_name), expected)

    def choice(self, field_name: str, allowed: tuple[str, ...]) -> None:
        """Raise :class:`ConfigError` unless ``field_name`` is one of ``allowed``."""
        _choice(self.key(field_name), getattr(self, field_name), allowed)


@dataclass(frozen=True)
class RunConfig:
    """The keys every run has (snake_case), with the defaults of pyproject.toml, and the
    method sections (``sections``: name -> :class:`ConfigSection`)."""

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
    #: share of the assigned nodes evaluated in a round (the last round evaluates all)
    fraction_evaluate: float = 1.0
    min_evaluate_nodes: int = 1
    #: labelled samples per class a routed (test-time / held-out) client uses; 0 = label-free
    routing_labels: int = 0
    #: simulated drift: from this round on, ``drift-fraction`` of the training clients draw
    #: their data from another group's distribution (0 = no drift; flux_app/data/drift.py)
    drift_round: int = 0
    drift_fraction: float = 0.3
    model: str = "auto"
    seed: int = 0
    device: str = "auto"
    #: deterministic kernels (torch.use_deterministic_algorithms, cuDNN without autotuning); a
    #: node's node-config ``device`` overrides ``device`` for that node
    deterministic: bool = False
    output_dir: str = ""
    run_name: str = ""
    eval_every: int = 1
    round_timeout: float = 600.0
    #: most messages awaiting a reply at once; 0 = a batch all at once (large simulations:
    #: Flower's simulation engine scans nodes x stored messages every 0.1 s)
    max_messages_in_flight: int = 0
    min_nodes: int = 0
    #: a train reply whose model is more than this many times longer (L2) than the lower median
    #: of its cluster's other trained models in the round is rejected; 0 = no bound
    max_model_norm_ratio: float = 2.0
    #: the same for the update (trained - sent); 0 = no bound
    max_update_norm_ratio: float = 0.0
    #: a node announcing more than this many times the lower median train size of the other
    #: nodes is excluded (its weight in every average is its own word); 0 = no bound
    max_train_size_ratio: float = 1000.0
    #: write the server state every N complete rounds (and after the last); 0 = never
    checkpoint_every: int = 1
    #: a run folder of ``output-dir`` whose checkpoint this run continues
    resume_from: str = ""
    #: the model's input and output; 0 = from ``dataset`` (see ``model_input``)
    num_classes: int = 0
    image_size: int = 0
    channels: int = 0
    #: comma-separated class names: a site's label folders may use them (index = position)
    class_names: str = ""
    #: K for the methods that are told the number of clusters (IFCA, FeSEM, kmeans-flux)
    num_clusters: int = 3
    #: how a cluster combines its members' updates (:mod:`flux_app.engine.aggregation`)
    cluster_aggregator: str = "fedavg"
    #: module paths imported by the ServerApp and the ClientApp (they register methods)
    plugins: str = ""
    #: ``"key=value ..."``: keys of plug-in sections (Flower only accepts declared keys)
    plugin_config: str = ""
    sections: Mapping[str, ConfigSection] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Canonical form: every registered section present (its defaults when not given), so
        # two configs with the same values compare equal however they were built.
        registry.load_plugins(self.plugins)
        run_sections = registry.sections_for(self.plugins).items()
        full = {name: self.sections.get(name) or cls() for name, cls in run_sections}
        object.__setattr__(self, "sections", full)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, strict: bool = True) -> RunConfig:
        """Build from a Flower run-config (kebab-case keys).

        Imports the plug-ins named by ``plugins`` first (their sections and strategies
        register), adds the keys of ``plugin-config``, then checks every key.

        Parameters
        ----------
        values : Mapping[str, Any]
            ``context.run_config`` or any dict with kebab-case (or snake_case) keys.
        strict : bool
            Reject keys this app does not know (a typo would otherwise be ignored silently).
        """
        values = {k.replace("_", "-"): v for k, v in values.items()}
        try:
            registry.load_plugins(str(values.get("plugins", "")))
        except registry.RegistryError as err:
            raise ConfigError(str(err)) from None
        for key, value in parse_plugin_config(str(values.get("plugin-config", ""))).items():
            if key in values and values[key] != value:  # to_dict() output holds both, equal
                raise ConfigError(
                    f"run-config key {key!r} is given twice, as {values[key]!r} and in "
                    f"plugin-config as {value!r}"
                )
            values[key] = value
        common = {f.name: f for f in fields(cls) if f.name != "sections"}
        owners = _section_keys(str(values.get("plugins", "")))
        kwargs: dict[str, Any] = {}
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            key = _current_key(key)
            name = key.replace("-", "_")
            if name in common:
                default = common[name].default
                kwargs[name] = _coerce(key, value, default, numeric=name in _NUMERIC_OR_AUTO)
            elif key in owners:
                section_cls, fname = owners[key]
                default = {f.name: f.default for f in fields(section_cls)}[fname]
                by_section.setdefault(section_cls.name(), {})[fname] = _coerce(key, value, default)
            elif strict:
                known = sorted(k.replace("_", "-") for k in common) + sorted(owners)
                raise ConfigError(f"unknown run-config key {key!r}; known keys: {', '.join(known)}")
        sections = {
            name: section_cls(**by_section.get(name, {}))
            for name, section_cls in registry.sections_for(str(values.get("plugins", ""))).items()
        }
        cfg = cls(**kwargs, sections=sections)
        cfg.validate()
        return cfg

    def section(self, section_cls: type[S]) -> S:
        """This run's values of a method's section (its defaults when the run sets none)."""
        got = self.sections.get(section_cls.name())
        return got if isinstance(got, section_cls) else section_cls()

    def replace(self, **changes: Any) -> RunConfig:
        """Copy with some keys changed, validated; names are snake_case keys, common or of a
        section (``replace(lr=0.1, flux_proj_dim=4)``)."""
        common = {f.name for f in fields(self)}
        owners = _section_keys(self.plugins)
        sections = dict(self.sections)
        kept = {}
        for name, value in changes.items():
            if name in common:
                kept[name] = value
                continue
            key = _current_key(name.replace("_", "-"))
            if key not in owners:
                raise ConfigError(f"unknown run-config key {key!r}")
            section_cls, fname = owners[key]
            sections[section_cls.name()] = dataclasses.replace(
                sections.get(section_cls.name()) or section_cls(), **{fname: value}
            )
        cfg = dataclasses.replace(self, **kept, sections=sections)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict of every key (common and every registered section), as written to
        run_config.json and accepted by ``from_mapping``."""
        out = {
            f.name.replace("_", "-"): getattr(self, f.name)
            for f in fields(self)
            if f.name != "sections"
        }
        for section in self.sections.values():
            out.update(section.to_dict())
        return out

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad key (common keys, then sections)."""
        _validate_common(self)
        for section in self.sections.values():
            section.validate()

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
    def class_name_list(self) -> list[str]:
        """``class-names`` as a list (empty when not set)."""
        return [n.strip() for n in self.class_names.split(",") if n.strip()]

    @property
    def model_input(self) -> tuple[tuple[int, int, int], int]:
        """``((C, H, W), num_classes)`` of the run's models, from ``channels``, ``image-size``,
        ``num-classes`` (or ``class-names``) and, where those are 0, the ``dataset``'s shape; the
        ``px`` shift colours its images, so it has 3 channels."""
        c, size, classes = DATASET_SHAPES[self.dataset]
        if self.shift == "px":
            c = 3
        classes = self.num_classes or len(self.class_name_list) or classes
        size = self.image_size or size
        return (self.channels or c, size, size), classes

    @property
    def resolved_output_dir(self) -> str:
        """Absolute output folder: ``output-dir``, else $FLUX_APP_OUTPUT_DIR, else ./outputs.

        The ServerApp runs in the SuperLink's working directory, so the scripts pass an
        absolute ``output-dir``; a relative one is resolved here once, explicitly.
        """
        out = self.output_dir or os.environ.get("FLUX_APP_OUTPUT_DIR", "") or "outputs"
        return os.path.abspath(os.path.expanduser(out))


_NUMERIC_OR_AUTO = ("lr", "local_epochs", "momentum")
#: a run's folder name: inside output-dir, never a path
_RUN_NAME = re.compile(r"^[A-Za-z0-9_+=-][A-Za-z0-9._+=-]{0,127}$")


def _validate_common(cfg: RunConfig) -> None:
    """The checks of the keys every run has (:meth:`RunConfig.validate`)."""
    if cfg.strategy not in registry.STRATEGIES:
        registry.load_plugins(cfg.plugins)
    _choice("strategy", cfg.strategy, tuple(sorted(registry.STRATEGIES)))
    _choice("cluster-aggregator", cfg.cluster_aggregator, tuple(sorted(registry.AGGREGATORS)))
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("shift", cfg.shift, SHIFTS)
    _choice("device", cfg.device, DEVICES)
    if cfg.model != "auto":
        _choice("model", cfg.model, MODELS)
    _check(1 <= cfg.level <= 8, "level", cfg.level, "an integer in 1..8")
    _check(cfg.alpha > 0, "alpha", cfg.alpha, "> 0")
    _check(0 < cfg.rho <= 1, "rho", cfg.rho, "in (0, 1]")
    _check(cfg.holdout_clients >= 0, "holdout-clients", cfg.holdout_clients, ">= 0")
    _check(cfg.num_server_rounds >= 1, "num-server-rounds", cfg.num_server_rounds, ">= 1")
    _check(cfg.batch_size >= 1, "batch-size", cfg.batch_size, ">= 1")
    _check(0 <= cfg.val_fraction < 1, "val-fraction", cfg.val_fraction, "in [0, 1)")
    _check(0 < cfg.fraction_train <= 1, "fraction-train", cfg.fraction_train, "in (0, 1]")
    _check(0 < cfg.fraction_evaluate <= 1, "fraction-evaluate", cfg.fraction_evaluate, "in (0, 1]")
    _check(cfg.min_evaluate_nodes >= 1, "min-evaluate-nodes", cfg.min_evaluate_nodes, ">= 1")
    _check(0 <= cfg.routing_labels <= 10_000, "routing-labels", cfg.routing_labels, "in [0, 10000]")
    _check(cfg.drift_round >= 0, "drift-round", cfg.drift_round, ">= 0 (0 = no drift)")
    _check(0 < cfg.drift_fraction <= 1, "drift-fraction", cfg.drift_fraction, "in (0, 1]")
    for key in ("max-model-norm-ratio", "max-update-norm-ratio", "max-train-size-ratio"):
        value = getattr(cfg, key.replace("-", "_"))
        _check(value == 0 or value > 1, key, value, "0 (no bound) or > 1")
    _check(cfg.eval_every >= 1, "eval-every", cfg.eval_every, ">= 1")
    _check(cfg.round_timeout > 0, "round-timeout", cfg.round_timeout, "> 0")
    _check(
        cfg.max_messages_in_flight >= 0,
        "max-messages-in-flight",
        cfg.max_messages_in_flight,
        ">= 0 (0 = all at once)",
    )
    _check(cfg.checkpoint_every >= 0, "checkpoint-every", cfg.checkpoint_every, ">= 0 (0 = never)")
    if cfg.momentum != "auto":
        _check(float(cfg.momentum) >= 0, "momentum", cfg.momentum, '>= 0 or "auto"')
    _check(cfg.weight_decay >= 0, "weight-decay", cfg.weight_decay, ">= 0")
    _check(cfg.num_clusters >= 1, "num-clusters", cfg.num_clusters, ">= 1")
    _check(
        cfg.num_classes == 0 or cfg.num_classes >= 2,
        "num-classes",
        cfg.num_classes,
        ">= 2 (0 = from dataset)",
    )
    _check(
        cfg.image_size == 0 or 4 <= cfg.image_size <= 1024,
        "image-size",
        cfg.image_size,
        "in 4..1024 (0 = from dataset)",
    )
    _check(cfg.channels in (0, 1, 3), "channels", cfg.channels, "1, 3 or 0 (= from dataset)")
    names = cfg.class_name_list
    _check(len(set(names)) == len(names), "class-names", cfg.class_names, "distinct names")
    _check(
        not names or len(names) == cfg.model_input[1],
        "class-names",
        cfg.class_names,
        f"{cfg.model_input[1]} names, one per class (num-classes)",
    )
    if cfg.lr != "auto":
        lr = float(cfg.lr)
        _check(math.isfinite(lr) and lr > 0, "lr", cfg.lr, 'a finite number > 0 or "auto"')
    for key in ("alpha", "rho", "weight_decay", "val_fraction", "round_timeout"):
        value = getattr(cfg, key)
        _check(math.isfinite(value), key.replace("_", "-"), value, "a finite number")
    if cfg.momentum != "auto":
        _check(math.isfinite(float(cfg.momentum)), "momentum", cfg.momentum, "a finite number")
    _check(
        not cfg.run_name or bool(_RUN_NAME.match(cfg.run_name)),
        "run-name",
        cfg.run_name,
        "one plain folder name (letters, digits, . _ + = -, not starting with a dot)",
    )
    if cfg.local_epochs != "auto":
        _check(int(cfg.local_epochs) >= 1, "local-epochs", cfg.local_epochs, '>= 1 or "auto"')


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


def parse_plugin_config(text: str) -> dict[str, Any]:
    """``"k=v k2=v2"`` (spaces or commas between pairs; values as in TOML, bare words as text)."""
    out: dict[str, Any] = {}
    for item in (t for t in re.split(r"[,\s]+", text.strip()) if t):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"plugin-config entry {item!r} is not key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def _section_keys(plugins: str = "") -> dict[str, tuple[type[ConfigSection], str]]:
    """Run-config key -> (section class, field) over the sections of a run."""
    sections = registry.sections_for(plugins).values()
    return {k: (cls, f) for cls in sections for k, f in cls.keys().items()}


def _current_key(key: str) -> str:
    """The current name of a renamed key (with a deprecation warning), else ``key``."""
    for section_cls in registry.SECTIONS.values():
        new = section_cls.renamed.get(key)
        if new is not None:
            msg = f"run-config key {key!r} is deprecated; use {new!r} (the old name goes in the next release)"
            warnings.warn(msg, DeprecationWarning, stacklevel=3)
            logger.warning(msg)
            return new
    return key
