"""Local training and evaluation loops, and device choice.

Client data lives in memory as tensors (a few thousand images per client), so batches are index
slices of a seeded permutation: no DataLoader workers, identical batches in simulation, in
deployment and in the in-process grid for the same seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


def set_deterministic(on: bool) -> None:
    """Deterministic kernels for this process (``on``) or torch's defaults (``off``).

    On: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel then
    raises instead of varying), cuDNN deterministic and not autotuned, and the cuBLAS
    workspace setting deterministic GEMMs need on CUDA >= 10.2 (set before cuBLAS starts).
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != on:
        torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Parameters
    ----------
    name : str
        ``auto`` | ``cpu`` | ``cuda`` (or an explicit ``cuda:N``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f'device={name!r} was asked for but torch sees no CUDA GPU; use device="auto" or "cpu"'
        )
    return torch.device(name)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` mini-batches; a seeded permutation when ``shuffle``."""
    n = len(x)
    # the permutation is drawn on the CPU (same batches on every device), then indexes the data
    # where it lives
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(x.device)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


@dataclass
class TrainResult:
    """Mean training loss over all steps, samples seen per epoch, number of steps."""

    loss: float
    num_examples: int
    steps: int


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    trainable: Iterable[nn.Module] | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """SGD over the local data; one optimizer for all epochs (momentum carries over).

    Parameters
    ----------
    model : nn.Module
        Trained in place (moved to ``device`` and left there).
    x, y : torch.Tensor
        Local inputs and integer labels.
    epochs, lr, momentum, weight_decay, batch_size
        Optimiser settings.
    device : torch.device or str
        Where to compute.
    seed : int
        Seeds the batch order (the caller derives it from run seed, round and partition).
    trainable : iterable of nn.Module, optional
        Only these sub-modules learn; the rest is frozen and kept in eval mode (FedDAG's
        phases). ``None`` trains everything.
    proximal_mu : float
        FedProx's proximal term: adds ``mu / 2 * ||w - w_received||^2`` over the trained
        parameters to every step's loss (0: plain SGD, the same arithmetic as without it).
    """
    device = torch.device(device)
    model.to(device)
    model.train()
    if trainable is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        modules = list(trainable)
        keep = {id(p) for m in modules for p in m.parameters()}
        params = [p for p in model.parameters() if id(p) in keep]
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        model.eval()
        for m in modules:
            m.train()
    if len(x) == 0:
        return TrainResult(loss=float("nan"), num_examples=0, steps=0)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    # The data moves to the device once, and the loss is summed there in float64 (the same
    # additions as a Python float sum): no host sync per step on a GPU.
    x, y = x.to(device), y.to(device)
    total = torch.zeros((), dtype=_sum_dtype(device), device=device)
    steps = 0
    try:
        for _ in range(epochs):
            for xb, yb in batches(x, y, batch_size, shuffle=True, generator=generator):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    loss = loss + 0.5 * proximal_mu * prox
                loss.backward()
                optimizer.step()
                total += loss.detach().to(total.dtype)
                steps += 1
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return TrainResult(loss=float(total) / max(steps, 1), num_examples=len(x), steps=steps)


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for loss sums, except where the device has none (Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class EvalResult:
    """Mean loss, accuracy in [0, 1] and number of samples."""

    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> EvalResult:
    """Loss and accuracy of ``model`` on ``(x, y)``; NaN for an empty set."""
    if len(x) == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    device = torch.device(device)
    model.to(device)
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    x, y = x.to(device), y.to(device)
    loss = torch.zeros((), dtype=_sum_dtype(device), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for xb, yb in batches(x, y, batch_size):
        logits = model(xb)
        loss += loss_fn(logits, yb).to(loss.dtype)
        correct += (logits.argmax(1) == yb).sum()
    n = len(x)
    return EvalResult(loss=float(loss) / n, accuracy=int(correct) / n, num_examples=n)
