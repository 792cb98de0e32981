"""The attack calling convention: `atk = Name(model, ...)`, `x_adv = atk(x, y)`.

Every attack runs the model in eval mode and restores each module's mode afterwards, takes
gradients with `torch.autograd.grad` (so `param.grad` is never touched), and returns a
detached tensor. Randomness comes from a per-attack generator seeded by `seed`, so a fresh
attack with the same seed gives the same examples; no global flags.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.models.runtime import eval_mode


class Attack:
    """Base class: subclasses implement `perturb(x, y, target)` on detached inputs."""

    def __init__(self, model: nn.Module, seed: int | None = None) -> None:
        self.model = model
        self.seed = seed
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The attack's own random stream on `device` (None: torch's global stream)."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        with eval_mode(self.model), torch.enable_grad():
            x_adv = self.perturb(x.detach(), y.detach(), target)
        return x_adv.detach()

    def perturb(self, x, y, target):
        raise NotImplementedError

    def input_gradient(
        self, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient, logits): ascent direction of the summed cross-entropy at `x_adv`.

        Untargeted: gradient of CE(f(x), y). Targeted: gradient of -CE(f(x), target), so an
        ascent step moves toward the target class either way.
        """
        x_adv = x_adv.detach().requires_grad_(True)
        logits = self.model(x_adv)
        if target is None:
            loss = F.cross_entropy(logits, y, reduction="sum")
        else:
            loss = -F.cross_entropy(logits, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        return grad, logits.detach()
