"""Would training many clients' models at once (batched over clients) speed up a round?

Issue #15 asks, if that is what it takes to approach the arithmetic limit, for a batched
simulation path. This probe answers the question before anything is built: it runs the same
SGD steps of ``G`` clients' models (each its own weights and batch) two ways, in one process on
the same threads, alternated:

* ``loop``: what the simulation does today, one ``nn.Module`` and optimiser per client, one
  client after another;
* ``vmap``: the ``G`` models stacked and stepped together with ``torch.func`` (``vmap`` of
  ``grad`` of ``functional_call``; SGD with momentum on the stacked tensors).

and reports the time of one step of all ``G`` clients, the ratio, and the largest difference of
the weights after the steps (float rounding expected; a batched path must agree with the
per-client one).

Example::

    OMP_NUM_THREADS=1 python scripts/batched_probe.py --clients 1,10,20 --steps 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from flux_app.common.models import build_model

MODELS = {
    # FLUX protocol: LeNet-5 (average pool), FMNIST px (3 channels), batch 64
    "flux-lenet5": ({"model": "lenet5"}, (3, 28, 28)),
    # FedDAG protocol: the dual-encoder CNN (max pool), FMNIST, batch 64
    "feddag-dual": ({"model": "cnn", "dual": True}, (1, 28, 28)),
}


def _model(name: str, seed: int) -> nn.Module:
    spec, shape = MODELS[name]
    return build_model(spec["model"], shape, 10, dual=spec.get("dual", False), seed=seed)


def _data(g: int, steps: int, batch: int, shape: tuple[int, int, int]):
    gen = torch.Generator().manual_seed(1234)
    x = torch.rand(steps, g, batch, *shape, generator=gen)
    y = torch.randint(0, 10, (steps, g, batch), generator=gen)
    return x, y


def run_loop(name: str, g: int, x: torch.Tensor, y: torch.Tensor, lr: float, mom: float):
    models = [_model(name, seed) for seed in range(g)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=mom) for m in models]
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for step in range(x.shape[0]):
        for c in range(g):
            opts[c].zero_grad(set_to_none=True)
            loss = loss_fn(models[c](x[step, c]), y[step, c])
            loss.backward()
            opts[c].step()
    seconds = time.perf_counter() - start
    return seconds, [{k: v.detach() for k, v in m.named_parameters()} for m in models]


def run_vmap(name: str, g: int, x: torch.Tensor, y: torch.Tensor, lr: float, mom: float):
    models = [_model(name, seed) for seed in range(g)]
    base = models[0]
    names = [k for k, _ in base.named_parameters()]
    params = {
        k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k in names
    }
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}

    def loss_of(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(base, p, (xb,)), yb)

    step_grads = vmap(grad(loss_of))
    start = time.perf_counter()
    first = True
    for step in range(x.shape[0]):
        grads = step_grads(params, x[step], y[step])
        with torch.no_grad():
            for k in names:  # torch.optim.SGD's momentum rule (dampening 0, no nesterov)
                if first:
                    bufs[k].copy_(grads[k])
                else:
                    bufs[k].mul_(mom).add_(grads[k])
                params[k].sub_(lr * bufs[k])
        first = False
    seconds = time.perf_counter() - start
    return seconds, [{k: params[k][c] for k in names} for c in range(g)]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="flux-lenet5,feddag-dual")
    ap.add_argument(
        "--clients", default="1,10,20", help="clients stepped together, comma-separated"
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternations of loop / vmap")
    ap.add_argument("--output", default="", help="write the figures as JSON here")
    args = ap.parse_args()
    lr, mom = 0.005, 0.9
    rows = []
    for name in args.models.split(","):
        shape = MODELS[name][1]
        for g in (int(v) for v in args.clients.split(",")):
            x, y = _data(g, args.steps, args.batch, shape)
            run_loop(name, g, x[:2], y[:2], lr, mom)  # warm both paths' lazy set-up
            run_vmap(name, g, x[:2], y[:2], lr, mom)
            loop_s, vmap_s = [], []
            for _ in range(args.repeats):
                s, loop_w = run_loop(name, g, x, y, lr, mom)
                loop_s.append(s)
                s, vmap_w = run_vmap(name, g, x, y, lr, mom)
                vmap_s.append(s)
            diff = max(
                float((a[k] - b[k]).abs().max())
                for a, b in zip(loop_w, vmap_w, strict=True)
                for k in a
            )
            row = {
                "model": name,
                "clients": g,
                "steps": args.steps,
                "batch": args.batch,
                "loop_ms_per_step": 1000 * min(loop_s) / args.steps,
                "vmap_ms_per_step": 1000 * min(vmap_s) / args.steps,
                "loop_over_vmap": min(loop_s) / min(vmap_s),
                "max_weight_diff": diff,
                "threads": torch.get_num_threads(),
            }
            rows.append(row)
            print(
                f"{name:12s} clients={g:3d}  loop {row['loop_ms_per_step']:8.1f} ms/step  "
                f"vmap {row['vmap_ms_per_step']:8.1f} ms/step  loop/vmap {row['loop_over_vmap']:.2f}x  "
                f"max |dw| {diff:.2e}",
                flush=True,
            )
    if args.output:
        Path(args.output).write_text(
            json.dumps({"command": vars(args), "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
