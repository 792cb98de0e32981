"""Auto-PGD (Croce & Hein 2020, arXiv 2003.01690): step-size-free PGD with momentum.

Follows the paper's Algorithm 1 and the reference `autopgd_base.py`:
- start at a random point of the ball's surface, x + eps * t / ||t|| (Linf: t ~ U[-1,1]^d;
  L2: t ~ N(0, I));
- step size 2 * eps; momentum 0.75 (no momentum on the first step):
  z = P(x_k + eta * step(grad)),  x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}));
- checkpoints w_j = ceil(p_j * N) with p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06). At each checkpoint, per example, halve
  the step when (1) fewer than 75% of the steps since the last checkpoint increased the loss,
  or (2) the step was not halved at the last checkpoint and the best loss has not improved
  since then; halving restarts the example from its best point so far (the momentum term
  of the next step is then x_best - x_k, as in the paper and the reference code);
- the returned point is the highest-loss iterate, or any iterate that fooled the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.gradient import succeeded
from robust_transfer.attacks.threats import make_threat
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import predict_logits

MOMENTUM = 0.75
RHO = 0.75  # condition (1): fraction of successful steps below which the step is halved


def checkpoints(n_iter: int) -> list[int]:
    """Iterations at which APGD may halve its step: ceil(p_j * n_iter), p as in the paper."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = {math.ceil(q * n_iter - 1e-9) for q in p[1:]}  # 1e-9: 0.57 * 100 is 57, not 58
    return sorted(m for m in marks if 1 <= m <= n_iter)


class APGD(Attack):
    """APGD-CE (`loss="ce"`) or APGD-DLR (`loss="dlr"`); Linf or L2 (Croce & Hein 2020,
    arXiv 2003.01690). Published defaults: 100 iterations, 1 restart here (AutoAttack's
    standard version also uses 1 for APGD-CE).

    Targeted, `atk(x, y, target=t)`: the targeted loss (targeted DLR:
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2)); success means predicting t.
    Restarts run only on the examples not yet fooled.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        norm: str = "linf",
        steps: int = 100,
        loss: str = "ce",
        restarts: int = 1,
        seed: int | None = 0,
    ) -> None:
        super().__init__(model, seed, loss)
        check_choice("APGD norm", norm, {"linf", "l2"})
        if steps < 1 or restarts < 1:
            raise UserError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
        self.threat = make_threat(norm, eps)
        self.norm, self.eps, self.steps, self.restarts = norm, float(eps), steps, restarts

    def perturb(self, x, y, target):
        best_x = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            idx = (~fooled).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            tgt = None if target is None else target[idx]
            x_best, x_fooled, fooled_r = self.single_run(x[idx], y[idx], tgt)
            best_x[idx] = torch.where(fooled_r.view(-1, 1, 1, 1), x_fooled, x_best)
            fooled[idx] = fooled_r
        return best_x

    def _step(self, x_adv, grad, eta):
        if self.norm == "linf":
            return x_adv + eta * grad.sign()
        norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return x_adv + eta * grad / (norm + 1e-12)

    def single_run(self, x, y, target, any_misclassification: bool = False):
        """One APGD run: (highest-loss point, a fooling point where found, fooled mask).

        Fooled means predicting `target` on a targeted run, unless `any_misclassification`:
        then any label other than y counts, as in APGD-T (where the target only steers).
        """
        goal = None if any_misclassification else target
        n, n_iter = len(x), self.steps
        view = (-1,) + (1,) * (x.ndim - 1)
        gen = self.generator(x.device)
        if self.norm == "linf":
            t = 2 * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1
            t = t / t.flatten(1).abs().max(1).values.view(view).clamp_min(1e-12)
        else:  # Gaussian direction: uniform on the L2 sphere (a normalised cube sample is not)
            t = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            t = t / t.flatten(1).norm(dim=1).view(view).clamp_min(1e-12)
        project = self.threat.project
        x_adv = project((x + self.eps * t).clamp(0, 1), x)

        grad, logits = self.input_gradient(x_adv, y, target)
        loss = self.last_loss
        fooled = succeeded(logits, y, goal)
        x_fooled = x_adv.clone()
        x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
        losses = [loss]  # f(x^0), f(x^1), ...: for condition (1)

        eta = torch.full((n, *view[1:]), 2 * self.eps, device=x.device, dtype=x.dtype)
        marks = set(checkpoints(n_iter))
        last_mark = 0
        loss_best_last_mark = loss_best.clone()
        reduced_last_mark = torch.ones(n, dtype=torch.bool, device=x.device)
        x_prev = x_adv.clone()
        for k in range(n_iter):
            with torch.no_grad():
                z = project(self._step(x_adv, grad, eta), x)
                if k == 0:
                    x_new = z
                else:
                    x_new = project(x_adv + MOMENTUM * (z - x_adv)
                                    + (1 - MOMENTUM) * (x_adv - x_prev), x)
                x_prev, x_adv = x_adv, x_new
            grad, logits = self.input_gradient(x_adv, y, target)
            loss = self.last_loss
            with torch.no_grad():
                now = succeeded(logits, y, goal)
                x_fooled[now & ~fooled] = x_adv[now & ~fooled]
                fooled |= now
                losses.append(loss)
                improved = loss > loss_best
                x_best[improved], grad_best[improved] = x_adv[improved], grad[improved]
                loss_best = torch.where(improved, loss, loss_best)
                if k + 1 in marks:
                    window = torch.stack(losses[last_mark:k + 2])
                    n_up = (window[1:] > window[:-1]).sum(0)
                    cond1 = n_up < RHO * (k + 1 - last_mark)
                    cond2 = ~reduced_last_mark & (loss_best_last_mark >= loss_best)
                    halve = cond1 | cond2
                    reduced_last_mark = halve
                    loss_best_last_mark = loss_best.clone()
                    last_mark = k + 1
                    if halve.any():
                        eta[halve] /= 2
                        x_adv[halve] = x_best[halve]
                        grad[halve] = grad_best[halve]
                        # x_prev stays x_k: the paper's (and autopgd_base.py's) next momentum
                        # term is x_best - x_k, across the jump
        return x_best, x_fooled, fooled


class APGDT(Attack):
    """APGD-T (Croce & Hein 2020, arXiv 2003.01690), as in AutoAttack's standard version:
    targeted DLR loss towards each of the `n_target_classes` most likely wrong classes in
    turn (9 by default, fewer when the model has fewer classes), 100 iterations each, on
    the examples that are still robust. Untargeted in effect: `atk(x, y)`, and as in the
    reference code an example counts as broken when a run reaches any wrong class, the
    target or not.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        norm: str = "linf",
        steps: int = 100,
        n_target_classes: int = 9,
        seed: int | None = 0,
    ) -> None:
        super().__init__(model, seed, "dlr")
        self.inner = APGD(model, eps, norm, steps, loss="dlr", restarts=1, seed=seed)
        self.norm, self.eps, self.n_target_classes = norm, float(eps), n_target_classes

    def perturb(self, x, y, target):
        if target is not None:
            return self.inner.perturb(x, y, target)
        logits = predict_logits(self.model, x)
        order = logits.argsort(dim=1, descending=True)
        n_classes = logits.shape[1]
        if n_classes < 4:
            raise UserError(f"APGD-T needs at least 4 classes (targeted DLR), got {n_classes}")
        best_x = x.clone()
        robust = logits.argmax(1) == y
        for k in range(1, min(self.n_target_classes, n_classes - 1) + 1):
            idx = robust.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            # the k-th most likely class other than the prediction (== y on robust examples)
            tgt = order[idx, k]
            # any misclassification on the way counts, not only reaching t (autopgd_base.py)
            _, x_fooled, hit = self.inner.single_run(x[idx], y[idx], tgt,
                                                     any_misclassification=True)
            best_x[idx[hit]] = x_fooled[hit]
            robust[idx[hit]] = False
        return best_x
