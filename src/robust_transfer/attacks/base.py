"""The attack calling convention: `atk = Name(model, ...)`, `x_adv = atk(x, y)`.

Every attack runs the model in eval mode and restores each module's mode afterwards, takes
gradients with `torch.autograd.grad` (so `param.grad` is never touched), and returns a
detached tensor. Randomness comes from a per-attack generator seeded by `seed`, so a fresh
attack with the same seed gives the same examples; no global flags.
"""

from __future__ import annotations

import torch
from torch import nn

from robust_transfer.attacks.losses import get_loss
from robust_transfer.models.runtime import eval_mode


class Attack:
    """Base class: subclasses implement `perturb(x, y, target)` on detached inputs.

    `loss` names the per-example objective the gradient attacks ascend ("ce", "cw" margin,
    "dlr"; see `attacks.losses`). Class attributes describe the attack to evaluators:
    `minimal_norm` (finds the smallest perturbation, no eps), `black_box` (no gradients),
    `norm` (the norm its perturbations are measured in).
    """

    minimal_norm: bool = False
    black_box: bool = False
    norm: str = "linf"

    def __init__(self, model: nn.Module, seed: int | None = None, loss: str = "ce") -> None:
        self.model = model
        self.seed = seed
        self.loss = loss
        self.loss_fn = get_loss(loss)
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
        if target is not None:
            target = target.detach().to(y.device)
        with eval_mode(self.model), torch.enable_grad():
            x_adv = self.perturb(x.detach(), y.detach(), target)
        return x_adv.detach()

    def perturb(self, x, y, target):
        raise NotImplementedError

    def input_gradient(
        self, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient, logits): ascent direction of the summed loss at `x_adv`.

        Untargeted: gradient of loss(f(x), y), e.g. CE(f(x), y). Targeted: gradient of the
        targeted loss, e.g. -CE(f(x), target), so an ascent step moves toward the target class
        either way. One forward and one backward; `self.last_loss` keeps the per-example loss.
        """
        x_adv = x_adv.detach().requires_grad_(True)
        logits = self.model(x_adv)
        loss = self.loss_fn(logits, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        self.last_loss = loss.detach()
        return grad, logits.detach()
