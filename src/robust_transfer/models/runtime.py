"""Running models: device choice, exact mode save/restore, batched prediction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from robust_transfer.errors import UserError, check_choice


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; asking for absent CUDA is a `UserError`."""
    check_choice("device", name, {"auto", "cpu", "cuda"})
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA device is available; use cpu or auto")
    return torch.device(name)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode, then restore each module's own flag exactly.

    `model.train(was_training)` would not do: it would wake frozen BatchNorm layers that the
    transfer protocol deliberately keeps in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of `model` on `x` in eval mode, batched; on `x`'s device."""
    device = next(model.parameters()).device
    with eval_mode(model):
        out = [model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return torch.cat(out).to(x.device)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of `x` that `model` classifies as `y`."""
    if len(y) == 0:
        return float("nan")
    return (predict_logits(model, x, batch_size).argmax(1) == y).float().mean().item()
