"""PGD on the KL divergence to the model's own clean prediction: TRADES' inner maximisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.attacks.gradient import PGD
from robust_transfer.attacks.rng import ExampleRNG
from robust_transfer.errors import check_choice

STARTS = ("normal", "uniform")
NORMAL_START = 0.001  # TRADES' code: x' = x + 0.001 * N(0, I)


class KLPGD(PGD):
    """PGD that ascends KL(f(x) || f(x')), the divergence of the prediction at x' from the
    prediction at the clean x (TRADES, Zhang et al. 2019, arXiv 1901.08573, Alg. 1).

    The labels are not used: the attack moves the prediction away from the model's own clean
    softmax, which is what TRADES' boundary term penalises. At x' = x the KL is at its minimum
    and its gradient is zero, so the attack starts from a random point: `start="normal"` is
    TRADES' code, x + 0.001 N(0, I), clipped to [0,1] (the code clips only after the first
    step, so its first gradient may be taken up to 0.001|N| outside the box; here the model
    never sees an input outside [0,1]); `start="uniform"` the threat model's uniform start in
    the ball. Draws are per example
    (`ExampleRNG`, keyed by `seed` and the image). One run, no restarts (a training attack).

    Shape: x (N, C, H, W) in [0,1], y (N,) (ignored) -> (N, C, H, W).

    Example:
        x_adv = KLPGD(model, eps=0.3, norm="linf", steps=10, seed=0)(x, y)
    """

    name = ""  # a training attack, not in the evaluation registry

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float | None = None,
                 steps: int = 10, norm: str = "linf", seed: int | None = None,
                 start: str = "normal") -> None:
        super().__init__(model, eps, alpha, steps, norm, random_start=True, seed=seed)
        check_choice("KL-PGD start", start, STARTS)
        self.start = start

    def start_point(self, x: torch.Tensor) -> torch.Tensor:
        """Where the ascent starts (see the class docstring)."""
        rng = ExampleRNG.for_inputs(x, self.seed)
        if self.start == "uniform":
            return self.threat.random_start(x, rng, 0)
        noise = rng.normal(tuple(x.shape[1:]), 0, dtype=x.dtype)
        return (x + NORMAL_START * noise).clamp(0, 1)

    def perturb(self, x, y, target):
        with torch.no_grad():
            clean = F.log_softmax(self.model(x), dim=1)

        def kl(logits, _y, _target):  # per example, as every attack loss
            return F.kl_div(F.log_softmax(logits, dim=1), clean, reduction="none",
                            log_target=True).sum(1)

        self.loss_fn = kl  # one run on the whole batch, so rows line up with `clean`
        x_adv = self.start_point(x)
        for _ in range(self.steps):
            grad, _ = self.input_gradient(x_adv, y, None)
            x_adv = self.threat.project(self.threat.step(x_adv, grad, self.alpha), x)
        return x_adv
