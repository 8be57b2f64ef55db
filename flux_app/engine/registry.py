"""Registries: what a run can name (strategies, client queries, config sections, train hooks).

A method makes itself available by decorating its pieces where they are defined::

    @register_strategy("hist-kmeans")
    class HistKMeans(ClusteredStrategy): ...

    @register_query("label-histogram")
    def handle_histogram(content, runtime): ...

    @register_config
    @dataclass(frozen=True)
    class HistKMeansConfig(ConfigSection):
        prefix: ClassVar[str] = "hist-kmeans-"
        k_max: int = 8

Built-in methods register when :mod:`flux_app.methods` is imported; a plug-in module (run-config
``plugins``) registers the same way when :func:`load_plugins` imports it. Nothing here imports a
method: the engine finds methods only through these tables.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover - types only
    from flux_app.engine.client import Handler, TrainHook
    from flux_app.engine.config import ConfigSection
    from flux_app.engine.strategy import ClusteredStrategy

logger = logging.getLogger("flwr")

#: run-config ``strategy`` -> class
STRATEGIES: dict[str, type[ClusteredStrategy]] = {}
#: ``query.<action>`` -> handler ``(content, runtime) -> RecordDict``
QUERIES: dict[str, Handler] = {}
#: section name -> config section class (its keys start with the section's prefix)
SECTIONS: dict[str, type[ConfigSection]] = {}
#: name -> hook run by the generic train handler after local training (config ``after-train``)
TRAIN_HOOKS: dict[str, TrainHook] = {}
#: run-config ``cluster-aggregator`` -> factory ``(cfg) -> Aggregator`` (one per cluster)
AGGREGATORS: dict[str, Callable[..., Any]] = {}

#: imported before any plug-in: the built-in aggregators and methods register themselves
BUILTIN = ("flux_app.engine.aggregation", "flux_app.engine.delivery", "flux_app.methods")
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")

T = TypeVar("T")


class RegistryError(ValueError):
    """A name is registered twice, is malformed, or a plug-in cannot be imported."""


def _check_name(kind: str, name: str, table: dict[str, Any], obj: Any) -> None:
    if not _NAME.match(name):
        raise RegistryError(
            f"{kind} name {name!r} must be lower-case kebab-case (e.g. 'my-method')"
        )
    old = table.get(name)
    if old is not None and old is not obj and _qualname(old) != _qualname(obj):
        raise RegistryError(f"{kind} {name!r} is already registered by {_qualname(old)}")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register_strategy(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a :class:`ClusteredStrategy` subclass runnable as ``strategy=name``."""

    def deco(cls: type[T]) -> type[T]:
        _check_name("strategy", name, STRATEGIES, cls)
        cls.name = name  # type: ignore[attr-defined]
        STRATEGIES[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def register_query(action: str) -> Callable[[T], T]:
    """Function decorator: serve ``query.<action>`` on every node with this handler.

    ``action`` must be a Python identifier (Flower routes ``query.<action>`` by it).
    """

    def deco(fn: T) -> T:
        if not action.isidentifier():
            raise RegistryError(f"query action {action!r} must be a Python identifier")
        old = QUERIES.get(action)
        if old is not None and _qualname(old) != _qualname(fn):
            raise RegistryError(f"query.{action} is already registered by {_qualname(old)}")
        QUERIES[action] = fn  # type: ignore[assignment]
        return fn

    return deco


def register_config(cls: type[T]) -> type[T]:
    """Class decorator: a method's run-config section (a frozen dataclass of ConfigSection)."""
    name = getattr(cls, "section", "") or cls.prefix.rstrip("-")  # type: ignore[attr-defined]
    _check_name("config section", name, SECTIONS, cls)
    for other_name, other in SECTIONS.items():
        if other_name != name and other.prefix == cls.prefix:  # type: ignore[attr-defined]
            raise RegistryError(f"config prefix {cls.prefix!r} is already used by {other_name!r}")  # type: ignore[attr-defined]
    SECTIONS[name] = cls  # type: ignore[assignment]
    return cls


def register_train_hook(name: str) -> Callable[[T], T]:
    """Function decorator: a step the generic train handler runs after local training when the
    train config says ``after-train = name`` (FedDAG keeps its update sketch this way)."""

    def deco(fn: T) -> T:
        _check_name("train hook", name, TRAIN_HOOKS, fn)
        TRAIN_HOOKS[name] = fn  # type: ignore[assignment]
        return fn

    return deco


def register_aggregator(name: str) -> Callable[[T], T]:
    """Decorator: a ``cluster-aggregator`` choice; the decorated callable takes the run's
    config and returns a fresh aggregator (one per cluster, so its state is per cluster)."""

    def deco(factory: T) -> T:
        _check_name("cluster aggregator", name, AGGREGATORS, factory)
        AGGREGATORS[name] = factory  # type: ignore[assignment]
        return factory

    return deco


def parse_plugins(spec: str) -> list[str]:
    """Module paths of run-config ``plugins`` (comma- or space-separated), checked."""
    mods = [m for m in re.split(r"[,\s]+", spec or "") if m]
    for m in mods:
        if not _MODULE_PATH.match(m):
            raise RegistryError(
                f"run-config key 'plugins': {m!r} is not a module path (e.g. 'my_pkg.my_method')"
            )
    return mods


def load_plugins(spec: str = "") -> list[str]:
    """Import the built-in methods and every plug-in module of ``spec``; their decorators
    register them. Importing twice is a no-op. Returns the plug-in module names."""
    for module in BUILTIN:
        importlib.import_module(module)
    mods = parse_plugins(spec)
    for m in mods:
        try:
            importlib.import_module(m)
        except ImportError as err:
            raise RegistryError(
                f"plug-in {m!r} (run-config 'plugins') cannot be imported: {err}. It must be "
                "installed or on the Python path where the ServerApp and ClientApp run"
            ) from err
    return mods


def sections_for(spec: str = "") -> dict[str, type[ConfigSection]]:
    """The config sections of a run: the built-in ones and those of its plug-ins ``spec``
    (a section registered by another plug-in, imported earlier in this process, is not part of
    this run's configuration)."""
    mods = parse_plugins(spec)

    def ours(module: str) -> bool:
        return module.startswith("flux_app.") or any(
            module == m or module.startswith(m + ".") for m in mods
        )

    return {name: cls for name, cls in SECTIONS.items() if ours(cls.__module__)}


def strategy_class(name: str) -> type[ClusteredStrategy]:
    """The registered strategy ``name``, or a clear error listing the available ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise RegistryError(
            f"strategy {name!r} is not registered; available: {', '.join(sorted(STRATEGIES))}"
            " (a plug-in's strategy needs its module in run-config 'plugins')"
        ) from None


def query_handler(action: str) -> Handler:
    """The handler of ``query.<action>``."""
    try:
        return QUERIES[action]
    except KeyError:
        raise RegistryError(
            f"no handler for query.{action}; registered: {', '.join(sorted(QUERIES))}"
        ) from None


__all__ = [
    "AGGREGATORS",
    "QUERIES",
    "SECTIONS",
    "STRATEGIES",
    "TRAIN_HOOKS",
    "RegistryError",
    "load_plugins",
    "parse_plugins",
    "query_handler",
    "register_aggregator",
    "register_config",
    "register_query",
    "register_strategy",
    "register_train_hook",
    "sections_for",
    "strategy_class",
]
