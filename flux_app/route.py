"""Route a new client offline with a finished FLUX run, and predict its images.

    python -m flux_app.route --run outputs/<run> --data /srv/new-site [--out predictions.csv]

``--data`` is a folder in the site layout (README "Deployment onto real sites"): its
``unlabeled/`` images are routed (else ``test/``, else ``train/``, without using their labels).
The chosen cluster is printed; the cluster model's predictions for those images go to ``--out``
(default ``<data>/flux-app/<run name>/predictions.csv``). No Flower is involved.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch

from flux_app.data.folder import DataFolderError, load_folder
from flux_app.engine.delivery import OUTPUT_FOLDER, safe_name
from flux_app.methods.flux.router import Router


def route_folder(run: str, data: str, out: str | None = None, labels_per_class: int = 0) -> dict:
    """Route the images of ``data`` with the router of ``run``; write predictions; a summary.

    ``labels_per_class = k > 0``: the folder's labelled images (up to k a class) join the
    routing (few-label routing, as ``routing-labels`` in a run)."""
    if labels_per_class < 0:
        raise ValueError("--labels-per-class must be >= 0")
    router = Router.load(run)
    m = router.manifest
    c, size, _ = m["input_shape"]
    site = load_folder(
        data,
        channels=c,
        image_size=size,
        num_classes=m["num_classes"],
        class_names=m["class_names"],
    )
    if len(site.unlabeled):
        x, names = site.unlabeled, site.unlabeled_names
    else:  # a labelled folder: route its test (or train) inputs, labels unused
        d = site.data
        x = d.x_test if len(d.x_test) else torch.cat([d.x_train, d.x_val])
        names = [f"{i:05d}" for i in range(len(x))]
    if not len(x):
        raise DataFolderError(f"no image to route in {data!r}")
    d = site.data
    labelled = (
        torch.cat([d.x_train, d.x_val, d.x_test]),
        torch.cat([d.y_train, d.y_val, d.y_test]),
    )
    cluster, distances = router.route(x, labelled, labels_per_class)
    model = router.model(cluster)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(x[i : i + 512]), 1) for i in range(0, len(x), 512)])
    conf, pred = probs.max(1)
    run_dir = os.path.normpath(run)
    if os.path.basename(run_dir) == "router":
        run_dir = os.path.dirname(run_dir)
    if out is None:
        name = safe_name(os.path.basename(os.path.abspath(run_dir)))
        out = os.path.join(os.path.abspath(data), OUTPUT_FOLDER, name, "predictions.csv")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    class_names = m["class_names"]
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", *(["class"] if class_names else []), "confidence"])
        for f, p, cf in zip(names, pred, conf, strict=True):
            w.writerow(
                [f, int(p), *([class_names[int(p)]] if class_names else []), f"{float(cf):.6f}"]
            )
    return {
        "cluster": cluster,
        # label-free: distances to the centroids; with labels: -2 log-likelihoods
        "distances" if labels_per_class == 0 else "scores": [round(float(v), 6) for v in distances],
        "images": len(x),
        "skipped": len(site.skipped),
        "predictions": out,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flux_app.route", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--run", required=True, help="a FLUX run folder (holding router/)")
    ap.add_argument("--data", required=True, help="the new client's data folder")
    ap.add_argument("--out", default=None, help="predictions CSV (default inside --data)")
    ap.add_argument(
        "--labels-per-class",
        type=int,
        default=0,
        help="use up to this many of the folder's labelled images per class (0 = label-free)",
    )
    args = ap.parse_args(argv)
    try:
        summary = route_folder(args.run, args.data, args.out, args.labels_per_class)
    except (FileNotFoundError, ValueError) as err:
        print(f"flux_app.route: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
