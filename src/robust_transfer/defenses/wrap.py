"""`Defended(model, *transforms)`: a classifier behind input transformations, as one model.

Because the defended model is an ordinary `nn.Module` that takes [0,1] images and returns
logits, every attack and `attacks.evaluate` accept it unchanged; the adaptive options
(`bpda`, `eot_samples`, attacks/adaptive.py) act on the `InputTransform`s inside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robust_transfer.attacks.adaptive import InputTransform
from robust_transfer.errors import UserError

# Seed offset between the random transforms of one chain: odd, about 2^32 / golden ratio, and
# below 2^32 (a torch CPU generator keeps only the low 32 bits of its seed).
STREAM = 0x9E3779B9


def chain_seeds(seed: int, randomized: Sequence[bool]) -> list[int]:
    """The seed of each transform of a chain: its k-th random transform (k = 0, 1, ...)
    draws from seed + k * STREAM mod 2^32 (the first from `seed` itself), so two random
    transforms of one chain do not repeat each other's draws; deterministic ones get `seed`
    (unused)."""
    out, k = [], 0
    for random in randomized:
        out.append((seed + k * STREAM) % 2**32 if random and k else seed)
        k += bool(random)
    return out


class Defended(nn.Module):
    """model(t_k(...t_1(x))): the transforms in order, then the classifier.

    `differentiable` is False when some transform is (BPDA applies), `randomized` is True
    when some transform draws randomness (EOT applies); `reseed(seed)` restarts every
    random transform's draws, each from its own stream of `seed` (`chain_seeds`), as
    `DefenseSpec.build(model, seed)` seeds them.

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
        seeds = chain_seeds(seed, [t.randomized for t in self.transforms])
        for t, s in zip(self.transforms, seeds, strict=True):
            if t.randomized:
                t.reseed(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.transforms(x))
