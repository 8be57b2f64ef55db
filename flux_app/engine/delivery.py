"""What a site gets out of the federation: its cluster's final model and predictions.

At the end of a run the server sends every node that holds a data folder (node-config
``data-path``) a ``query.deliver`` message with the model of the cluster it was assigned (or
routed) to. The node writes, inside its own folder::

    <data-path>/flux-app/<run-name>/model.pt          the state dict (torch.load(..., weights_only=True))
    <data-path>/flux-app/<run-name>/predictions.csv   file, label, [class,] confidence per
                                                      image of unlabeled/ (when it has any)

``run-name`` is checked to be one plain folder name, so nothing is written outside the folder.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from flux_app.common.records import from_record, get_array_record, to_record
from flux_app.engine.client import ClientRuntime, config_of
from flux_app.engine.registry import register_query

if TYPE_CHECKING:  # pragma: no cover
    from flux_app.engine.strategy import ClusteredStrategy

logger = logging.getLogger("flwr")

DELIVER = "query.deliver"
OUTPUT_FOLDER = "flux-app"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_name(name: str) -> str:
    """``name`` if it is one plain folder name (no separator, not ``.``/``..``), else an error."""
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"run name {name!r} is not a plain folder name (letters, digits, . _ -)")
    return name


def deliver(
    strategy: ClusteredStrategy, placement: Mapping[int, int], run_name: str, server_round: int
) -> dict[str, dict[str, Any]]:
    """Send each node with a data folder the model of its cluster; what each node wrote."""
    contents = {}
    for node_id, cluster in placement.items():
        node = strategy.nodes.get(node_id)
        if node is None or not node.has_folder or cluster not in strategy.models:
            continue
        contents[node_id] = RecordDict(
            {
                "arrays": to_record(strategy.models[cluster]),
                "config": ConfigRecord(
                    {"server-round": server_round, "run-name": run_name, "cluster": int(cluster)}
                ),
            }
        )

    def parse(node_id: int, content: RecordDict) -> dict[str, Any]:
        m = content.metric_records["delivered"]
        return {"cluster": placement[node_id], "predictions": int(m["predictions"])}

    got = strategy.collect(DELIVER, contents, server_round, parse, what="delivery", exclude=False)
    return {strategy.nodes[n].name: v for n, v in got.items()}


@register_query("deliver")
def handle_deliver(content: RecordDict, rt: ClientRuntime) -> RecordDict:
    """Write the received model and the predictions for the unlabeled inputs into the node's
    own folder (a simulated partition has none: nothing is written)."""
    if not rt.data_path:
        raise ValueError("this node has no data folder (node-config data-path) to deliver into")
    config = config_of(content)
    folder = os.path.join(
        os.path.abspath(rt.data_path), OUTPUT_FOLDER, safe_name(str(config.get("run-name", "")))
    )
    os.makedirs(folder, exist_ok=True)
    state = from_record(get_array_record(content, "arrays"))
    _atomic_torch_save(dict(state), os.path.join(folder, "model.pt"))
    written = 0
    x = rt.unlabeled
    if len(x):
        model = rt.model_from(content).to(rt.device).eval()
        with torch.no_grad():
            probs = torch.cat(
                [
                    torch.softmax(model(x[i : i + 512].to(rt.device)), 1).cpu()
                    for i in range(0, len(x), 512)
                ]
            )
        conf, pred = probs.max(1)
        names = rt.cfg.class_name_list
        rows = [
            [f, int(p), *([names[int(p)]] if names else []), f"{float(c):.6f}"]
            for f, p, c in zip(rt.site.unlabeled_names, pred, conf, strict=True)
        ]
        header = ["file", "label", *(["class"] if names else []), "confidence"]
        _atomic_csv(os.path.join(folder, "predictions.csv"), header, rows)
        written = len(rows)
    logger.info("delivery: wrote %s (%d prediction(s))", folder, written)
    return RecordDict({"delivered": MetricRecord({"predictions": written})})


def _atomic_torch_save(obj: Any, path: str) -> None:
    # torch names the archive after the file: a plain name, not a dot-file
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="partial-", suffix=".pt")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_csv(path: str, header: list[str], rows: list[list[Any]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".csv")
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


__all__ = ["DELIVER", "OUTPUT_FOLDER", "deliver", "handle_deliver", "safe_name"]
