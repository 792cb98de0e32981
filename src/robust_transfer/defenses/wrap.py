"""`Defended(model, *transforms)`: a classifier behind input transformations, as one model.

Because the defended model is an ordinary `nn.Module` that takes [0,1] images and returns
logits, every attack and `attacks.evaluate` accept it unchanged; the adaptive options
(`bpda`, `eot_samples`, attacks/adaptive.py) act on the `InputTransform`s inside it.
"""

from __future__ import annotations

import torch
from torch import nn

from robust_transfer.attacks.adaptive import InputTransform
from robust_transfer.errors import UserError


class Defended(nn.Module):
    """model(t_k(...t_1(x))): the transforms in order, then the classifier.

    `differentiable` is False when some transform is (BPDA applies), `randomized` is True
    when some transform draws randomness (EOT applies); `reseed(seed)` restarts every
    random transform's draws.

    Shape: x (N, C, H, W) in [0,1] -> logits (N, num_classes).

    Example:
        defended = Defended(model, BitDepth(4), MedianSmoothing(2))
        table = evaluate(defended, x, y, ["pgd"], eps=[0.1], bpda=True)
    """

    def __init__(self, model: nn.Module, *transforms: InputTransform) -> None:
        super().__init__()
        for t in transforms:
            if not isinstance(t, InputTransform):
                raise UserError(f"a defense must be an InputTransform, got {type(t).__name__}")
        self.transforms = nn.Sequential(*transforms)
        self.model = model

    @property
    def differentiable(self) -> bool:
        return all(t.differentiable for t in self.transforms)

    @property
    def randomized(self) -> bool:
        return any(t.randomized for t in self.transforms)

    @property
    def spec(self):
        """The classifier's `ModelSpec` (number of classes, input channels)."""
        return self.model.spec

    def reseed(self, seed: int) -> None:
        for t in self.transforms:
            if hasattr(t, "reseed"):
                t.reseed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.transforms(x))
