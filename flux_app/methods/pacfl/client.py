"""Client side of PACFL: the ``query.subspaces`` action (FedDAG computes the same subspaces in
its own ``query.feddag``).

The server sends a ConfigRecord ``config`` with ``p`` (the number of left singular vectors per
class; default the run-config's ``pacfl-subspace-dim``). The node replies with ArrayRecord
``subspaces``: :meth:`ClassSubspaces.to_arrays` of its RAW flattened TRAIN inputs (``bases``
float32 ``[C, d, p]``, ``ranks`` and ``counts`` int64 ``[C]``). No model is involved, so the query
can run before any training (PACFL is one-shot, before round 1).
"""

from __future__ import annotations

from flwr.app import RecordDict

from flux_app.common.records import arrays_to_record
from flux_app.common.subspaces import class_subspaces
from flux_app.engine.client import ClientRuntime, config_of
from flux_app.engine.registry import register_query
from flux_app.methods.pacfl.config import PacflConfig

#: Upper bound on ``p`` a node accepts: the reply is ``C * d * p`` floats, so an absurd ``p``
#: from a misconfigured server must not make the node build a huge payload.
MAX_P = 64


@register_query("subspaces")
def handle_subspaces(content: RecordDict, rt: ClientRuntime) -> RecordDict:
    """Reply with the per-class top-``p`` subspaces of this node's raw train inputs.

    Parameters
    ----------
    content : RecordDict
        The query; ConfigRecord ``config`` may set ``p``.
    rt : ClientRuntime
        The node's run-config and data.

    Returns
    -------
    RecordDict
        ArrayRecord ``subspaces`` (``bases``, ``ranks``, ``counts``).
    """
    p = int(config_of(content).get("p", rt.cfg.section(PacflConfig).subspace_dim))
    if not 1 <= p <= MAX_P:
        raise ValueError(f"subspace dimension p must be in 1..{MAX_P}, not {p}")
    d = rt.data
    x = d.x_train.reshape(len(d.x_train), -1).numpy()
    subs = class_subspaces(x, d.y_train.numpy(), d.num_classes, p=p)
    return RecordDict({"subspaces": arrays_to_record(subs.to_arrays())})


__all__ = ["MAX_P", "handle_subspaces"]
