"""Gradient attacks under a norm-ball threat model: FGSM, BIM (I-FGSM) and PGD."""

from __future__ import annotations

import math

import torch
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.rng import ExampleRNG
from robust_transfer.attacks.threats import L1Threat, make_threat
from robust_transfer.errors import UserError


def succeeded(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per example: misclassified (untargeted) or classified as the target (targeted)."""
    pred = logits.argmax(1)
    return pred != y if target is None else pred == target


def _take(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx]


class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015, arXiv 1412.6572).

    x' = clip(x + eps * sign(grad_x loss)): one step of size eps in the threat model's
    steepest-ascent direction, then projected. With `norm="l2"` the step is the normalised
    gradient scaled to eps; with `norm="l1"` one sparse step of L1 size eps on the top 5% of
    coordinates by |grad| (one iteration of sparse L1 descent, Tramer & Boneh 2019).
    Targeted (`atk(x, y, target=t)`): x - eps * sign(grad of the loss toward t).

    Shape: x (N, C, H, W) in [0,1], y (N,) -> (N, C, H, W).

    Example:
        x_adv = FGSM(model, eps=8 / 255)(x, y)
    """

    name = "fgsm"
    norms = ("linf", "l2", "l1")
    supports_eot = True

    def __init__(self, model: nn.Module, eps: float = 8 / 255, norm: str = "linf") -> None:
        super().__init__(model)
        type(self).check_norm(norm)
        self.threat = make_threat(norm, eps)
        self.norm = norm

    @classmethod
    def build(
        cls, model: nn.Module, eps: float, norm: str, steps: int | None = None, seed: int = 0
    ) -> FGSM:
        """One step: `steps` and `seed` do not apply."""
        return cls(model, eps, norm)

    def perturb(self, x, y, target):
        grad, _ = self.input_gradient(x, y, target)
        return self.threat.project(self.threat.step(x, grad, self.threat.eps), x)


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018, arXiv 1706.06083).

    From x (or a uniform random point of the ball when `random_start`), take `steps`
    steepest-ascent steps of size `alpha` on the loss (cross-entropy by default), projecting
    onto the eps-ball and [0,1] after each. `alpha=None` uses Madry's 2.5 * eps / steps.

    - `norm`: "linf", "l2" or "l1" (sparse steps on the top `l1_sparsity` fraction of
      coordinates, exact projection onto the L1 ball and the box, as in APGD-L1).
    - `restarts=R`: R runs from independent random starts; each example keeps its worst case
      (the first run that fools it, else the highest-loss result). Later restarts only run
      on examples not yet fooled.
    - `return_best`: return each example's best iterate (fooling first, then highest loss)
      instead of the last one. One extra forward pass per run.

    Random starts are drawn per example (`ExampleRNG`: seed, the example's content, the
    restart index), so an example's result does not depend on the rest of its batch.

    Shape: x (N, C, H, W) in [0,1], y (N,) -> (N, C, H, W).

    Example:
        x_adv = PGD(model, eps=0.5, norm="l2", steps=20, restarts=3, seed=0)(x, y)
    """

    name = "pgd"
    norms = ("linf", "l2", "l1")
    default_steps = 20
    supports_eot = True

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool = True,
        seed: int | None = None,
        restarts: int = 1,
        return_best: bool = False,
        loss: str = "ce",
        l1_sparsity: float = 0.05,
    ) -> None:
        super().__init__(model, seed, loss)
        type(self).check_norm(norm)
        if steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        if restarts < 1:
            raise UserError(f"restarts must be >= 1, got {restarts}")
        self.threat = make_threat(norm, eps)
        if norm == "l1":
            self.threat = L1Threat(eps, l1_sparsity)
        self.norm = norm
        self.alpha = 2.5 * eps / steps if alpha is None else float(alpha)
        if self.alpha < 0:
            raise UserError(f"alpha must be >= 0, got {alpha}")
        self.steps = steps
        self.random_start = random_start
        self.restarts = restarts
        self.return_best = return_best

    @classmethod
    def build(
        cls, model: nn.Module, eps: float, norm: str, steps: int | None = None, seed: int = 0
    ) -> PGD:
        return cls(model, eps, steps=cls.default_steps if steps is None else steps, norm=norm,
                   seed=seed)

    def perturb(self, x, y, target):
        rng = ExampleRNG.for_inputs(x, self.seed) if self.random_start else None
        if self.restarts == 1 and not self.return_best:
            return self._run(x, y, target, rng)[0]  # the training hot path: no extra forward
        best_x = x.clone()
        best_loss = torch.full((len(x),), float("-inf"), device=x.device, dtype=x.dtype)
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for restart in range(self.restarts):
            idx = (~fooled).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x_r, loss_r, fooled_r = self._run(x[idx], y[idx], _take(target, idx),
                                              None if rng is None else rng[idx], restart,
                                              track=True)
            better = fooled_r | (loss_r > best_loss[idx])
            best_x[idx[better]] = x_r[better]
            best_loss[idx[better]] = loss_r[better]
            fooled[idx] = fooled_r
        return best_x

    def _run(self, x, y, target, rng: ExampleRNG | None, restart: int = 0, track: bool = False):
        """One PGD run: (x_adv, per-example loss, fooled); loss and fooled only if `track`.
        `rng` (None: no random start) and `restart` give each example its own start."""
        threat = self.threat
        x_adv = x if rng is None else threat.random_start(x, rng, restart)
        best = None
        for _ in range(self.steps):
            grad, logits = self.input_gradient(x_adv, y, target)
            if self.return_best:
                best = self._keep_best(best, x_adv, self.last_loss, succeeded(logits, y, target))
            x_adv = threat.project(threat.step(x_adv, grad, self.alpha), x)
        if not track and not self.return_best:
            return x_adv, None, None
        with torch.no_grad():
            logits = self.model(x_adv)
            state = (x_adv, self.loss_fn(logits, y, target), succeeded(logits, y, target))
        if self.return_best:
            state = self._keep_best(best, *state)
        return state

    @staticmethod
    def _keep_best(best, x_adv, loss, fooled):
        if best is None:
            return x_adv.clone(), loss.clone(), fooled.clone()
        b_x, b_loss, b_fooled = best
        better = (fooled & ~b_fooled) | ((fooled == b_fooled) & (loss > b_loss))
        b_x[better], b_loss[better], b_fooled[better] = x_adv[better], loss[better], fooled[better]
        return b_x, b_loss, b_fooled


class BIM(PGD):
    """Basic Iterative Method / I-FGSM (Kurakin et al. 2017, arXiv 1607.02533), L-infinity.

    x_{k+1} = clip_{x,eps}(x_k + alpha * sign(grad)), from x itself (no random start).
    Published defaults: alpha = 1/255 and steps = min(255*eps + 4, 1.25 * 255*eps) (these
    depend on eps, so there is no fixed `default_steps`). An L-infinity method only: for L2
    or L1 use PGD.

    Shape: x (N, C, H, W) in [0,1], y (N,) -> (N, C, H, W).

    Example:
        x_adv = BIM(model, eps=8 / 255)(x, y)
    """

    name = "bim"
    norms = ("linf",)
    default_steps = None

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int | None = None,
        loss: str = "ce",
        norm: str = "linf",
    ) -> None:
        type(self).check_norm(norm)
        if steps is None:
            eps = make_threat(norm, eps).eps  # a bad eps: the threat model's clear error
            steps = max(1, int(math.floor(min(255 * eps + 4, 1.25 * 255 * eps))))
        super().__init__(
            model, eps, 1 / 255 if alpha is None else alpha, steps, norm,
            random_start=False, loss=loss,
        )

    @classmethod
    def build(
        cls, model: nn.Module, eps: float, norm: str, steps: int | None = None, seed: int = 0
    ) -> BIM:
        """`steps=None`: the published eps-dependent default. No randomness: `seed` unused."""
        return cls(model, eps, steps=steps, norm=norm)
