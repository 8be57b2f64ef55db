"""Client side of FedDAG: the update sketch kept after warm-up and the ``query.feddag`` action.

During the LAST warm-up round the server's train config carries ``sketch-fraction`` and
``sketch-seed``; after local training the node keeps, in ``context.state``, its model update
(trained minus received, all float parameters flattened in sorted-key order) restricted to the
shared-seed random coordinates (:func:`flux_app.methods.feddag.sketch.sketch_indices`). Every party
derives the same coordinates from the seed, so only the values travel.

``query.feddag`` (ConfigRecord ``config``: ``p``, the subspace dimension) replies with
ArrayRecord ``sketch`` (``{"sketch": float32 [m]}``) and ArrayRecord ``subspaces``
(:meth:`ClassSubspaces.to_arrays`: top-``p`` left singular vectors per present class of the
node's raw flattened train inputs, ranks and class counts).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from flux_app.common.records import arrays_to_record, record_to_arrays
from flux_app.common.subspaces import class_subspaces
from flux_app.engine.client import ClientRuntime, config_of
from flux_app.engine.registry import register_query, register_train_hook
from flux_app.methods.feddag.config import FeddagConfig
from flux_app.methods.feddag.sketch import flatten_update, sketch, sketch_indices

STATE_KEY = "feddag-sketch"
#: the train hook (config ``after-train``) that keeps the sketch
SKETCH_HOOK = "feddag-sketch"


def store_update_sketch(
    rt: ClientRuntime,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    fraction: float,
    seed: int,
) -> None:
    """Keep the sketch of ``after - before`` in the node's state for ``query.feddag``."""
    update = flatten_update(after, before)
    idx = sketch_indices(update.size, fraction, seed)
    values = np.asarray(sketch(update, idx), dtype=np.float32)
    rt.state[STATE_KEY] = arrays_to_record({"sketch": values})


@register_train_hook(SKETCH_HOOK)
def keep_update_sketch(
    rt: ClientRuntime,
    config: ConfigRecord,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
) -> None:
    """After the last warm-up round's training: keep the update sketch (``sketch-fraction``
    and ``sketch-seed`` of the train config)."""
    store_update_sketch(
        rt, before, after, float(config["sketch-fraction"]), int(config.get("sketch-seed", 0))
    )


@register_query("feddag")
def handle_feddag(content: RecordDict, rt: ClientRuntime) -> RecordDict:
    """Reply with the stored update sketch and the class subspaces of the train inputs."""
    if STATE_KEY not in rt.state.array_records:
        raise RuntimeError("no warm-up sketch on this node: it has not finished FedDAG's warm-up")
    p = int(config_of(content).get("p", rt.cfg.section(FeddagConfig).subspace_dim))
    d = rt.data
    x = d.x_train.reshape(len(d.x_train), -1).numpy()
    subs = class_subspaces(x, d.y_train.numpy(), d.num_classes, p=p)
    stored = record_to_arrays(rt.state.array_records[STATE_KEY])
    return RecordDict(
        {
            "sketch": arrays_to_record({"sketch": stored["sketch"]}),
            "subspaces": arrays_to_record(subs.to_arrays()),
        }
    )
