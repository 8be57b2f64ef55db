"""Client-side logic behind the ClientApp's handlers.

Each handler takes the received ``RecordDict`` and a :class:`ClientRuntime` (run-config, which
partition this node holds, its data) and returns the reply's ``RecordDict``. Nothing here keeps
state between messages: in deployment every message may run in a fresh process, in simulation
one actor serves many nodes. The only memo is the deterministic data partition, keyed by
everything that defines it.

Message types (see ``client_app.py``)
-------------------------------------
``query.info``      -> MetricRecord ``info``: partition-id, num-partitions, num-train, num-val,
                       num-test, num-classes, group (ground-truth shift group, for metrics and
                       the Oracle only).
``train``           ArrayRecord ``arrays`` + ConfigRecord ``config`` -> ``arrays`` + MetricRecord
                       ``metrics`` (num-examples, train-loss). Generic options: ``lr``,
                       ``local-epochs``, ``trainable`` (parameter-name prefixes that learn, the
                       rest frozen), ``seed-tag``, ``proximal-mu`` (FedProx) and ``after-train``
                       (a registered train hook, e.g. FedDAG's update sketch).
``evaluate``        ``arrays`` + ``config`` -> ``metrics`` (accuracy, loss, num-examples on the
                       test share; val-accuracy, val-loss, num-val on the validation share).
``query.scores``    ArrayRecords ``model-0..model-{K-1}`` + ``config`` -> ``metrics`` with lists
                       ``losses`` / ``accuracies`` of every model on one split (IFCA, FeSEM, CFL
                       and routing by loss).
Method-specific queries (FLUX descriptors, FedDAG sketches, PACFL subspaces) live in their
method's package and register with ``@register_query``; the ClientApp serves every registered
``query.<action>``. The model architecture follows the received weights (a state dict with
``primary.*`` keys is FedDAG's dual-encoder model).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from torch import nn

from flux_app.common.models import build_model, is_dual
from flux_app.common.records import from_record, get_array_record, to_record
from flux_app.common.seeding import derive_seed
from flux_app.common.training import evaluate, resolve_device, set_deterministic, train
from flux_app.data import ClientData, ShiftSpec, load_source, make_client_data, partition_cache
from flux_app.data.drift import drift_regroup
from flux_app.data.folder import FolderData, load_folder
from flux_app.engine.config import RunConfig
from flux_app.engine.registry import TRAIN_HOOKS, register_query


class NodeConfigError(ValueError):
    """The SuperNode's node-config lacks what this app needs."""


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from a node-config, checked (``(-1, 0)`` for a site
    that brings its own data: node-config ``data-path``)."""
    if node_config.get("data-path") and "partition-id" not in node_config:
        return -1, 0
    try:
        pid = int(node_config["partition-id"])
        num = int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise NodeConfigError(
            "node-config must give the site's data folder, e.g. flower-supernode --node-config "
            "'data-path=\"/srv/site-a\"', or a partition of a simulated protocol, "
            "'partition-id=0 num-partitions=10'; got "
            f"{dict(node_config)}"
        ) from None
    if not 0 <= pid < num:
        raise NodeConfigError(f"partition-id {pid} is outside 0..{num - 1}")
    return pid, num


@lru_cache(maxsize=128)  # one entry per partition this process serves
def _partition(
    dataset: str,
    data_root: str,
    spec: ShiftSpec,
    num_partitions: int,
    partition_id: int,
    regroup: tuple[tuple[int, int], ...] = (),
) -> ClientData:
    """A simulated partition: from the node's disk cache when it was built before (a new
    ClientApp process per message must not rebuild it), else built and cached."""

    def build() -> ClientData:
        source = load_source(dataset, data_root, spec.seed)
        return make_client_data(source, spec, num_partitions, partition_id, regroup)

    definition = {
        "dataset": dataset,
        "data_root": data_root,
        "spec": asdict(spec),
        "num_partitions": num_partitions,
        "partition_id": partition_id,
    }
    if regroup:  # only then: every other partition keeps its cache key
        definition["regroup"] = [list(p) for p in regroup]
    return partition_cache.load_or_build(definition, build)


def shift_spec(cfg: RunConfig) -> ShiftSpec:
    """The data-partition part of a run-config."""
    return ShiftSpec(
        kind=cfg.shift,
        level=cfg.level,
        alpha=cfg.alpha,
        rho=cfg.rho,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
    )


def new_model(cfg: RunConfig, *, dual: bool = False, seed: int | None = None) -> nn.Module:
    """The run's model architecture (optionally FedDAG's dual-encoder version); its shape is the
    run-config's (:attr:`RunConfig.model_input`), the same on the server and every node."""
    shape, num_classes = cfg.model_input
    return build_model(cfg.model_name, shape, num_classes, dual=dual, seed=seed)


@lru_cache(maxsize=16)  # one entry per folder this process serves
def _site(
    path: str,
    channels: int,
    image_size: int,
    num_classes: int,
    class_names: tuple[str, ...],
    val_fraction: float,
    seed: int,
) -> FolderData:
    return load_folder(
        path,
        channels=channels,
        image_size=image_size,
        num_classes=num_classes,
        class_names=class_names,
        val_fraction=val_fraction,
        seed=seed,
    )


@dataclass
class ClientRuntime:
    """What a handler needs to know about the node it runs for."""

    cfg: RunConfig
    partition_id: int
    num_partitions: int
    #: ``context.state``: the node's own records across messages (e.g. FedDAG's sketch)
    state: RecordDict = field(default_factory=RecordDict, repr=False)
    #: the site's own data folder (node-config ``data-path``); empty for a simulated partition
    data_path: str = ""
    #: the round of the message being served (its group id; 0 when unknown): drift needs it
    server_round: int = 0
    _data: ClientData | None = field(default=None, repr=False)
    _site: FolderData | None = field(default=None, repr=False)

    @classmethod
    def from_context(
        cls,
        run_config: Mapping[str, Any],
        node_config: Mapping[str, Any],
        state: RecordDict | None = None,
    ) -> ClientRuntime:
        """Build from Flower's ``context.run_config``, ``node_config`` and ``state``."""
        cfg = RunConfig.from_mapping(run_config, strict=False)
        if node_config.get("data-root"):
            cfg = cfg.replace(data_root=str(node_config["data-root"]))
        if node_config.get("device"):  # the node knows its hardware better than the run
            cfg = cfg.replace(device=str(node_config["device"]))
        set_deterministic(cfg.deterministic)
        pid, num = node_partition(node_config)
        data_path = str(node_config.get("data-path", "")) if pid < 0 else ""
        return cls(cfg, pid, num, RecordDict() if state is None else state, data_path)

    @property
    def site(self) -> FolderData | None:
        """The site's folder data (``None`` for a simulated partition), read once per process."""
        if self.data_path and self._site is None:
            (c, size, _), classes = self.cfg.model_input
            names = tuple(self.cfg.class_name_list)
            cfg = self.cfg
            self._site = _site(self.data_path, c, size, classes, names, cfg.val_fraction, cfg.seed)
        return self._site

    @property
    def name(self) -> str:
        """The node's name in results: its partition id, or its data folder's name."""
        return (
            str(self.partition_id)
            if self.partition_id >= 0
            else os.path.basename(os.path.abspath(self.data_path))
        )

    @property
    def unlabeled(self) -> torch.Tensor:
        """Inputs without labels (a site's ``unlabeled/``; none for a simulated partition)."""
        site = self.site
        if site is None:
            shape, _ = self.cfg.model_input
            return torch.zeros(0, *shape)
        return site.unlabeled

    @property
    def data(self) -> ClientData:
        """This node's data (train / val / test): its folder's, or its simulated partition,
        built once per process."""
        if self._data is None and self.site is not None:
            self._data = self.site.data
        if self._data is None:
            self._data = _partition(
                self.cfg.dataset,
                self.cfg.data_root,
                shift_spec(self.cfg),
                self.num_partitions,
                self.partition_id,
                self._drift(),
            )
        return self._data

    def _drift(self) -> tuple[tuple[int, int], ...]:
        """This node's new group once ``drift-round`` has come (simulated drift), else ()."""
        cfg = self.cfg
        if cfg.drift_round <= 0 or self.server_round < cfg.drift_round:
            return ()
        spec = shift_spec(cfg)
        source = load_source(cfg.dataset, cfg.data_root, spec.seed)
        moves = drift_regroup(
            source, spec, self.num_partitions, cfg.holdout_clients, cfg.drift_fraction
        )
        return tuple((p, g) for p, g in moves if p == self.partition_id)

    @property
    def device(self) -> torch.device:
        """Where this node computes (run-config ``device``, or the node-config's)."""
        return resolve_device(self.cfg.device)

    def seed_for(self, *parts: object) -> int:
        """A seed specific to this run, this partition and ``parts`` (e.g. round, phase)."""
        return derive_seed(
            self.cfg.seed, self.partition_id if self.partition_id >= 0 else self.name, *parts
        )

    def model_from(self, content: RecordDict, key: str = "arrays") -> nn.Module:
        """Build the run's model (the architecture the weights are for) and load them."""
        state = from_record(get_array_record(content, key))
        model = new_model(self.cfg, dual=is_dual(state))
        model.load_state_dict(state)
        return model


def config_of(content: RecordDict) -> ConfigRecord:
    """The ConfigRecord ``config`` of a message (empty when absent)."""
    return content.config_records.get("config", ConfigRecord())


# ----------------------------------------------------------------------------- handlers
@register_query("info")
def handle_info(content: RecordDict, rt: ClientRuntime) -> RecordDict:
    """Reply to ``query.info`` with sizes, partition (or site name), ground-truth group (-1 =
    unknown) and, for a site, its unlabeled inputs and the files it could not read."""
    d = rt.data
    site = rt.site
    info = MetricRecord(
        {
            "partition-id": rt.partition_id,
            "num-partitions": rt.num_partitions,
            "num-train": len(d.y_train),
            "num-val": len(d.y_val),
            "num-test": len(d.y_test),
            "num-classes": d.num_classes,
            "input-shape": [int(v) for v in d.x_train.shape[1:]],
            "group": int(d.group),
            "num-unlabeled": len(rt.unlabeled),
            "num-skipped": len(site.skipped) if site is not None else 0,
            "has-folder": int(site is not None),
        }
    )
    return RecordDict({"info": info, "node": ConfigRecord({"name": rt.name})})


def trainable_modules(model: nn.Module, prefixes: str) -> list[nn.Module] | None:
    """The top-level sub-modules named by comma-separated ``prefixes`` (``"primary.,head."``);
    ``""`` = everything (``None``). A prefix that names no sub-module is an error."""
    wanted = [p.strip().rstrip(".") for p in prefixes.split(",") if p.strip()]
    if not wanted:
        return None
    children = dict(model.named_children())
    unknown = [p for p in wanted if p not in children]
    if unknown:
        raise ValueError(f"trainable {unknown} name no part of the model (has {sorted(children)})")
    return [children[p] for p in wanted]


def handle_train(content: RecordDict, rt: ClientRuntime) -> RecordDict:
    """Local training of the received model; replies with the new weights.

    ConfigRecord ``config`` may set ``server-round``, ``lr``, ``local-epochs``, ``trainable``
    (comma-separated sub-module prefixes that learn; the rest is frozen), ``seed-tag`` (enters
    the batch-order seed, so two trainings of one round differ), ``proximal-mu`` (FedProx's
    term) and ``after-train`` (a hook registered with ``@register_train_hook``, which receives
    the config and the weights before and after training).
    """
    config = config_of(content)
    model = rt.model_from(content)
    trainable = trainable_modules(model, str(config.get("trainable", "")))
    hook_name = str(config.get("after-train", ""))
    hook = TRAIN_HOOKS.get(hook_name) if hook_name else None
    if hook_name and hook is None:
        raise ValueError(f"after-train hook {hook_name!r} is not registered on this node")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()} if hook else None
    d = rt.data
    result = train(
        model,
        d.x_train,
        d.y_train,
        epochs=int(config.get("local-epochs", rt.cfg.epochs)),
        lr=float(config.get("lr", rt.cfg.learning_rate)),
        momentum=rt.cfg.sgd_momentum,
        weight_decay=rt.cfg.weight_decay,
        batch_size=rt.cfg.batch_size,
        device=rt.device,
        seed=rt.seed_for(
            "train", int(config.get("server-round", 0)), str(config.get("seed-tag", "all"))
        ),
        trainable=trainable,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if hook is not None and before is not None:
        hook(rt, config, before, state)
    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss})
    return RecordDict({"arrays": to_record(state), "metrics": metrics})


def handle_evaluate(content: RecordDict, rt: ClientRuntime) -> RecordDict:
    """Accuracy and loss of the received model on the test and validation shares."""
    model = rt.model_from(content)
    d = rt.data
    test = evaluate(model, d.x_test, d.y_test, device=rt.device)
    metrics = {"accuracy": test.accuracy, "loss": test.loss, "num-examples": test.num_examples}
    if len(d.y_val):
        val = evaluate(model, d.x_val, d.y_val, device=rt.device)
        metrics.update(
            {"val-accuracy": val.accuracy, "val-loss": val.loss, "num-val": val.num_examples}
        )
    return RecordDict({"metrics": MetricRecord(metrics)})


@register_query("scores")
def handle_scores(content: RecordDict, rt: ClientRuntime) -> RecordDict:
    """Loss and accuracy of each of K received models on one split (``config/split``)."""
    config = config_of(content)
    split = str(config.get("split", "train"))
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, not {split!r}")
    d = rt.data
    x, y = getattr(d, f"x_{split}"), getattr(d, f"y_{split}")
    keys = sorted(
        (k for k in content.array_records if k.startswith("model-")), key=lambda k: int(k[6:])
    )
    if not keys:
        raise ValueError("query.scores needs ArrayRecords named model-0, model-1, ...")
    losses, accs = [], []
    for key in keys:
        res = evaluate(rt.model_from(content, key), x, y, device=rt.device)
        losses.append(res.loss)
        accs.append(res.accuracy)
    metrics = MetricRecord({"losses": losses, "accuracies": accs, "num-examples": len(y)})
    return RecordDict({"metrics": metrics})


Handler = Callable[[RecordDict, ClientRuntime], RecordDict]
#: ``(runtime, train config, state before, state after) -> None``
TrainHook = Callable[
    [ClientRuntime, ConfigRecord, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], None
]
