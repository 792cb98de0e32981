"""Fooling images (Nguyen et al. 2015, arXiv 1412.1897), gradient-ascent variant.

Images unrecognisable to humans that the model labels as a class with >= 99% confidence:
start from uniform noise or a blank (grey) image and ascend the log-probability of the
class (Nguyen et al. Sec. 3.3, after Simonyan et al.; Karpathy's linear-classifier demo),
staying in [0,1]. No norm constraint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import predict_logits


class FoolingImages(Attack):
    """`atk(x0, classes)`: drive each start image in x0 to its class with `confidence`.

    `generate(num_classes, shape, start="noise"|"blank")` makes the start images itself
    (one per class) and returns (images, confidences). Each step moves every image not yet
    confident by `step_size` along its L2-normalised gradient of log softmax(class).
    """

    def __init__(
        self,
        model: nn.Module,
        confidence: float = 0.99,
        steps: int = 500,
        step_size: float = 0.1,
        seed: int | None = 0,
    ) -> None:
        super().__init__(model, seed)
        if not 0 < confidence < 1 or steps < 1 or not step_size > 0:
            raise UserError(f"need 0 < confidence < 1, steps >= 1, step_size > 0; got "
                            f"{confidence}, {steps}, {step_size}")
        self.confidence, self.steps, self.step_size = confidence, steps, step_size

    def perturb(self, x, y, target):
        cls = y if target is None else target
        x_adv = x.clone()
        for _ in range(self.steps):
            xr = x_adv.detach().requires_grad_(True)
            logp = F.log_softmax(self.model(xr), 1).gather(1, cls.unsqueeze(1)).squeeze(1)
            todo = logp.detach().exp() < self.confidence
            if not todo.any():
                break
            (g,) = torch.autograd.grad(logp.sum(), xr)
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            step = self.step_size * g * todo.view(-1, 1, 1, 1)
            x_adv = (x_adv + step).clamp(0, 1)
        return x_adv

    def generate(self, num_classes: int, shape: tuple[int, ...], start: str = "noise",
                 device: torch.device | str = "cpu"):
        """One fooling image per class from `start`; returns (images, confidences)."""
        check_choice("start", start, {"noise", "blank"})
        device = torch.device(device)
        if start == "noise":
            x0 = torch.rand((num_classes, *shape), generator=self.generator(device),
                            device=device)
        else:
            x0 = torch.full((num_classes, *shape), 0.5, device=device)
        classes = torch.arange(num_classes, device=device)
        images = self(x0, classes)
        conf = predict_logits(self.model, images).softmax(1).gather(1, classes.unsqueeze(1))
        return images, conf.squeeze(1)
