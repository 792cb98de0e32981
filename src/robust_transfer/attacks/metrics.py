"""Robust accuracy of a model under one attack."""

from __future__ import annotations

import torch
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.models.runtime import predict_logits


def robust_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, batch_size: int = 512
) -> float:
    """Fraction of examples still classified correctly after `attack`, batched."""
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        x_adv = attack(xb, yb)
        correct += (predict_logits(model, x_adv).argmax(1) == yb).sum().item()
    return correct / max(len(x), 1)
