"""Server state to and from plain data: JSON text plus named tensors, no pickle.

A strategy's ``state_dict()`` is a tree of ``None``, bools, numbers, strings, lists, tuples,
dicts, numpy arrays, torch tensors and dataclasses of the types registered with
:func:`state_type`. :func:`encode` turns it into a JSON-able tree and a flat ``{name: tensor}``
dict; :func:`decode` rebuilds it. A checkpoint file therefore holds only JSON text and tensors
(``torch.load(..., weights_only=True)`` reads it) and decoding constructs nothing but the
registered dataclasses: a file cannot make the server run code.

Node ids change when a run is resumed (a new Flower run, re-registered SuperNodes), so a
mapping keyed by node id is wrapped in :class:`NodeKeyed` and a list of node ids in
:class:`NodeList`: they are written with node NAMES (stable: partition id or site name) and read
back with the ids the nodes have now; entries of nodes that are not (yet) back are dropped on
reading and reported by ``decode``'s ``missing`` list.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

C = TypeVar("C")

#: registered dataclasses by name (the only classes decoding may construct)
STATE_TYPES: dict[str, type] = {}


def state_type(cls: type[C]) -> type[C]:
    """Class decorator: allow dataclass ``cls`` inside a checkpointed state."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    name = f"{cls.__module__}.{cls.__qualname__}"
    STATE_TYPES[name] = cls
    return cls


class NodeKeyed(dict):
    """A mapping keyed by node id, written keyed by node name (see the module docstring)."""


class NodeList(list):
    """A list of node ids, written as node names (see the module docstring)."""


class StateError(ValueError):
    """A state that cannot be encoded, or a checkpoint that does not decode."""


def encode(obj: Any, node_name: Callable[[int], str]) -> tuple[Any, dict[str, torch.Tensor]]:
    """``obj`` -> (JSON-able tree, named tensors); ``node_name`` names node ids."""
    arrays: dict[str, torch.Tensor] = {}

    def put(value: torch.Tensor, kind: str) -> dict[str, str]:
        key = f"t{len(arrays)}"
        arrays[key] = value
        return {"__" + kind + "__": key}

    def enc(x: Any) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, np.integer)):
            return int(x)
        if isinstance(x, (float, np.floating)):
            x = float(x)
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, torch.Tensor):
            return put(x.detach().cpu().clone(), "tensor")
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biuf":
                raise StateError(f"cannot checkpoint a numpy array of dtype {x.dtype}")
            return put(torch.from_numpy(np.ascontiguousarray(x).copy()), "ndarray")
        if isinstance(x, NodeKeyed):
            return {"__nodes__": [[node_name(int(k)), enc(v)] for k, v in x.items()]}
        if isinstance(x, NodeList):
            return {"__nodelist__": [node_name(int(n)) for n in x]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v) for k, v in x.items()}
            return {"__dict__": [[enc(k), enc(v)] for k, v in x.items()]}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            name = f"{type(x).__module__}.{type(x).__qualname__}"
            if STATE_TYPES.get(name) is not type(x):
                raise StateError(f"{name} is not registered with @state_type")
            fields = {f.name: enc(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
            return {"__dataclass__": name, "fields": fields}
        raise StateError(f"cannot checkpoint a {type(x).__name__}")

    return enc(obj), arrays


def decode(
    tree: Any, arrays: dict[str, torch.Tensor], node_id: Callable[[str], int | None]
) -> tuple[Any, list[str]]:
    """Inverse of :func:`encode`; ``node_id`` maps a node name to its id now (``None``: not
    here). Returns the state and the names of nodes it mentions that are not here."""
    missing: list[str] = []

    def node(name: Any) -> int | None:
        found = node_id(str(name))
        if found is None and name not in missing:
            missing.append(str(name))
        return found

    def array(key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in arrays:
            raise StateError(f"checkpoint refers to a missing tensor {key!r}")
        return arrays[key]

    def dec(x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            raise StateError(f"unexpected {type(x).__name__} in a checkpoint")
        if len(x) == 1:
            ((tag, value),) = x.items()
            if tag == "__float__":
                return float(value) if value in ("nan", "inf", "-inf") else _bad(value)
            if tag == "__tensor__":
                return array(value)
            if tag == "__ndarray__":
                return array(value).numpy()
            if tag == "__tuple__":
                return tuple(dec(v) for v in value)
            if tag == "__dict__":
                return {_hashable(dec(k)): dec(v) for k, v in value}
            if tag == "__nodes__":
                return {n: dec(v) for k, v in value if (n := node(k)) is not None}
            if tag == "__nodelist__":
                return [n for k in value if (n := node(k)) is not None]
        if set(x) == {"__dataclass__", "fields"}:
            cls = STATE_TYPES.get(str(x["__dataclass__"]))
            if cls is None:
                raise StateError(f"checkpoint names an unknown type {x['__dataclass__']!r}")
            return cls(**{str(k): dec(v) for k, v in x["fields"].items()})
        return {str(k): dec(v) for k, v in x.items()}

    return dec(tree), missing


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _bad(value: Any) -> float:
    raise StateError(f"bad float {value!r} in a checkpoint")


__all__ = ["NodeKeyed", "NodeList", "STATE_TYPES", "StateError", "decode", "encode", "state_type"]
