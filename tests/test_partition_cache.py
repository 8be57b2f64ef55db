"""The node-side partition cache: built once, then read back identical; keyed by what defines
the partition; damaged or stale entries rebuilt; off when asked."""

from __future__ import annotations

import os

import pytest
import torch

from flux_app.data import ShiftSpec, load_source, make_client_data, partition_cache
from flux_app.engine import client as engine_client

SPEC = ShiftSpec(kind="px", level=2, alpha=0.5, rho=0.2, seed=3, val_fraction=0.2)


def _build():
    return make_client_data(load_source("synthetic", "", SPEC.seed), SPEC, 4, 1)


def _same(a, b) -> bool:
    tensors = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    plain = ("group", "num_classes", "partition_id", "shift", "source_name")
    return all(torch.equal(getattr(a, t), getattr(b, t)) for t in tensors) and all(
        getattr(a, p) == getattr(b, p) for p in plain
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(partition_cache.ENV, str(tmp_path / "cache"))
    engine_client._partition.cache_clear()
    yield tmp_path / "cache"
    engine_client._partition.cache_clear()


def test_built_once_then_read_back_identical(cache):
    calls = []

    def build():
        calls.append(1)
        return _build()

    first = partition_cache.load_or_build({"p": 1}, build)
    second = partition_cache.load_or_build({"p": 1}, build)
    assert len(calls) == 1 and len(os.listdir(cache)) == 1
    assert _same(first, second) and _same(second, _build())
    partition_cache.load_or_build({"p": 2}, build)  # another definition: another entry
    assert len(calls) == 2 and len(os.listdir(cache)) == 2


def test_the_engine_serves_the_same_partition_from_the_cache(cache):
    built = engine_client._partition("synthetic", "", SPEC, 4, 1)
    engine_client._partition.cache_clear()  # a new ClientApp process
    cached = engine_client._partition("synthetic", "", SPEC, 4, 1)
    assert _same(built, cached) and _same(cached, _build())
    assert len(os.listdir(cache)) == 1


def test_a_damaged_entry_is_rebuilt_and_off_means_off(cache, monkeypatch, caplog):
    partition_cache.load_or_build({"p": 1}, _build)
    (entry,) = cache.iterdir()
    entry.write_bytes(b"garbage")
    again = partition_cache.load_or_build({"p": 1}, _build)
    assert _same(again, _build()) and "unusable" in caplog.text
    monkeypatch.setenv(partition_cache.ENV, "off")
    assert partition_cache.cache_folder() is None
    partition_cache.load_or_build({"p": 9}, _build)
    assert len(list(cache.iterdir())) == 1


def test_the_key_covers_the_definition_and_the_code():
    a = partition_cache.cache_key({"dataset": "digits", "partition_id": 1})
    assert a == partition_cache.cache_key({"partition_id": 1, "dataset": "digits"})
    assert a != partition_cache.cache_key({"dataset": "digits", "partition_id": 2})
    assert len(partition_cache.code_digest()) == 64
