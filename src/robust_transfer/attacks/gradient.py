"""Gradient attacks under a norm-ball threat model: FGSM and PGD."""

from __future__ import annotations

from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.threats import make_threat
from robust_transfer.errors import UserError


class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015, arXiv 1412.6572).

    x' = clip(x + eps * sign(grad_x loss)). With `norm="l2"` the step is the normalised
    gradient scaled to eps. Targeted (`atk(x, y, target=t)`): x - eps * sign(grad of the loss
    toward t).
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, norm: str = "linf") -> None:
        super().__init__(model)
        self.threat = make_threat(norm, eps)

    def perturb(self, x, y, target):
        grad, _ = self.input_gradient(x, y, target)
        return self.threat.project(self.threat.step(x, grad, self.threat.eps), x)


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018, arXiv 1706.06083).

    From x (or a uniform random point of the ball when `random_start`), take `steps`
    steepest-ascent steps of size `alpha` on the cross-entropy, projecting onto the eps-ball
    and [0,1] after each. `alpha=None` uses Madry's 2.5 * eps / steps.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, seed)
        if steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        self.threat = make_threat(norm, eps)
        self.alpha = 2.5 * eps / steps if alpha is None else float(alpha)
        if self.alpha < 0:
            raise UserError(f"alpha must be >= 0, got {alpha}")
        self.steps = steps
        self.random_start = random_start

    def perturb(self, x, y, target):
        threat = self.threat
        x_adv = threat.random_start(x, self.generator(x.device)) if self.random_start else x
        for _ in range(self.steps):
            grad, _ = self.input_gradient(x_adv, y, target)
            x_adv = threat.project(threat.step(x_adv, grad, self.alpha), x)
        return x_adv
