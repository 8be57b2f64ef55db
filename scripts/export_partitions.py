#!/usr/bin/env python
"""Write a simulated protocol's partitions as real per-site folders, to try a deployment.

Each node ``i`` gets ``OUT/node_<i>/`` in the layout a SuperNode reads with
``--node-config 'data-path="OUT/node_<i>"'`` (README "Deployment onto real sites"):
``train/<label>/<n>.png`` (its train and validation shares), ``test/<label>/<n>.png`` and
``group.txt`` (its ground-truth group, read for metrics only). With ``--unlabeled``, the held-out
nodes (the last ``--holdout``) get only ``unlabeled/<n>.png`` (their test images) plus
``labels.csv`` beside it, the answers for checking their predictions (never read by the node).
``OUT/manifest.json`` records the protocol.

    python scripts/export_partitions.py --dataset digits --shift pxy --level 1 --nodes 6 \\
        --holdout 1 --unlabeled --out /tmp/sites
    bash scripts/deploy_local.sh --data-dir /tmp/sites -c 'strategy="flux" shift="pxy"'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def save_png(x, path: str) -> None:
    """Float ``[C, H, W]`` in [0, 1] -> 8-bit PNG (grey for one channel, else RGB)."""
    from PIL import Image

    arr = (np.clip(x.numpy(), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    img = (
        Image.fromarray(arr[0], "L")
        if arr.shape[0] == 1
        else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    )
    img.save(path)


def write_labelled(folder: str, xs, ys) -> int:
    """``folder/<label>/<n>.png`` for every image; returns how many."""
    for n, (x, y) in enumerate(zip(xs, ys, strict=True)):
        sub = os.path.join(folder, str(int(y)))
        os.makedirs(sub, exist_ok=True)
        save_png(x, os.path.join(sub, f"{n:05d}.png"))
    return len(ys)


def export(args: argparse.Namespace) -> dict:
    """Write every node's folder; returns the manifest."""
    import torch

    from flux_app.data import ShiftSpec, load_source, make_client_data

    spec = ShiftSpec(
        kind=args.shift,
        level=args.level,
        alpha=args.alpha,
        rho=args.rho,
        seed=args.seed,
        val_fraction=0.0,  # the site splits its own validation share
    )
    source = load_source(args.dataset, args.data_root, args.seed)
    os.makedirs(args.out, exist_ok=True)
    nodes = []
    for i in range(args.nodes):
        d = make_client_data(source, spec, args.nodes, i)
        folder = os.path.join(args.out, f"node_{i}")
        if os.path.exists(folder):
            raise SystemExit(f"{folder} exists: choose an empty --out")
        os.makedirs(folder)
        held_out = i >= args.nodes - args.holdout
        with open(os.path.join(folder, "group.txt"), "w") as fh:
            fh.write(f"{int(d.group)}\n")
        entry = {"node": i, "folder": folder, "group": int(d.group), "held_out": held_out}
        if held_out and args.unlabeled:
            unl = os.path.join(folder, "unlabeled")
            os.makedirs(unl)
            rows = []
            for n, (x, y) in enumerate(zip(d.x_test, d.y_test, strict=True)):
                name = f"{n:05d}.png"
                save_png(x, os.path.join(unl, name))
                rows.append(f"{name},{int(y)}")
            with open(os.path.join(folder, "labels.csv"), "w") as fh:
                fh.write("file,label\n" + "\n".join(rows) + "\n")
            entry["unlabeled"] = len(rows)
        else:
            x_train = torch.cat([d.x_train, d.x_val])
            y_train = torch.cat([d.y_train, d.y_val])
            entry["train"] = write_labelled(os.path.join(folder, "train"), x_train, y_train)
            entry["test"] = write_labelled(os.path.join(folder, "test"), d.x_test, d.y_test)
        nodes.append(entry)
        print(
            f"[export] {folder}: group {d.group}, "
            + ", ".join(
                f"{k} {v}" for k, v in entry.items() if k in ("train", "test", "unlabeled")
            ),
            flush=True,
        )
    manifest = {
        "dataset": args.dataset,
        "shift": args.shift,
        "level": args.level,
        "seed": args.seed,
        "alpha": args.alpha,
        "rho": args.rho,
        "nodes": nodes,
        "input_shape": list(d.input_shape),
        "num_classes": int(d.num_classes),
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="an empty folder; node_<i>/ are written below it")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--shift", default="px")
    ap.add_argument("--level", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--rho", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--holdout", type=int, default=0, help="the last H nodes are held out")
    ap.add_argument("--unlabeled", action="store_true", help="held-out nodes get only unlabeled/")
    args = ap.parse_args(argv)
    if not 0 <= args.holdout < args.nodes:
        ap.error("--holdout must be in 0..nodes-1")
    export(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
