"""PGD on the KL divergence to the model's own clean prediction: TRADES' inner maximisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.attacks.gradient import PGD


class KLPGD(PGD):
    """PGD that ascends KL(f(x) || f(x')), the divergence of the prediction at x' from the
    prediction at the clean x (TRADES, Zhang et al. 2019, arXiv 1901.08573, Alg. 1).

    The labels are not used: the attack moves the prediction away from the model's own clean
    softmax, which is what TRADES' boundary term penalises. At x' = x the KL is at its minimum
    and its gradient is zero, so the attack always starts from a random point of the ball
    (TRADES' code uses x + 0.001 N(0, I); here the threat model's uniform start, the one
    random start this package owns). One run, no restarts (a training-time attack).

    Shape: x (N, C, H, W) in [0,1], y (N,) (ignored) -> (N, C, H, W).

    Example:
        x_adv = KLPGD(model, eps=0.3, norm="linf", steps=10, seed=0)(x, y)
    """

    name = ""  # a training attack, not in the evaluation registry

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float | None = None,
                 steps: int = 10, norm: str = "linf", seed: int | None = None) -> None:
        super().__init__(model, eps, alpha, steps, norm, random_start=True, seed=seed)

    def perturb(self, x, y, target):
        with torch.no_grad():
            clean = F.log_softmax(self.model(x), dim=1)

        def kl(logits, _y, _target):  # per example, as every attack loss
            return F.kl_div(F.log_softmax(logits, dim=1), clean, reduction="none",
                            log_target=True).sum(1)

        self.loss_fn = kl  # one run on the whole batch, so rows line up with `clean`
        return super().perturb(x, y, None)
