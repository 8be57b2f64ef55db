"""Client side of FedDAG: the update sketch kept after warm-up and the ``query.feddag`` action.

During the LAST warm-up round the server's train config carries ``sketch-fraction`` and
``sketch-seed``; after local training the node keeps, in ``context.state``, its model update
(trained minus received, all float parameters flattened in sorted-key order) restricted to the
shared-seed random coordinates (:func:`flux_app.gradient_sketch.sketch_indices`). Every party
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
from flwr.app import RecordDict

from flux_app.client import ClientRuntime, config_of
from flux_app.gradient_sketch import flatten_update, sketch, sketch_indices
from flux_app.records import arrays_to_record, record_to_arrays
from flux_app.subspaces import class_subspaces

STATE_KEY = "feddag-sketch"


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


def handle_feddag(content: RecordDict, rt: ClientRuntime) -> RecordDict:
    """Reply with the stored update sketch and the class subspaces of the train inputs."""
    if STATE_KEY not in rt.state.array_records:
        raise RuntimeError("no warm-up sketch on this node: it has not finished FedDAG's warm-up")
    p = int(config_of(content).get("p", rt.cfg.feddag_subspace_dim))
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
