"""Minimal-perturbation attacks: Carlini-Wagner L2, DeepFool (L2, Linf), L-BFGS.

They search for the smallest perturbation that changes the decision, with no eps; an
evaluator compares the norm they find with each eps. An example they cannot fool comes back
unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.gradient import succeeded
from robust_transfer.attacks.losses import margin
from robust_transfer.errors import UserError, check_choice


def _sq_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).pow(2).sum(1)


class CW(Attack):
    """Carlini & Wagner L2 attack (arXiv 1608.04644).

    x' = (tanh(w) + 1) / 2 (w initialised at arctanh(0.999999 (2x - 1)));
    minimise ||x' - x||_2^2 + c * max(z_y - max_{i!=y} z_i, -kappa) with Adam (lr 1e-2);
    targeted: max(max_{i!=t} z_i - z_t, -kappa). Binary search over c per example: start at
    1e-3, x10 until the attack succeeds, then bisect; 9 search steps; each search step runs
    up to `steps` Adam iterations (10,000 in the reference code) and aborts when the loss has
    not dropped by 0.01% over a tenth of them. Returns the smallest-L2 success per example.
    """

    minimal_norm = True
    norm = "l2"

    def __init__(
        self,
        model: nn.Module,
        c: float = 1e-3,
        kappa: float = 0.0,
        steps: int = 10000,
        lr: float = 1e-2,
        search_steps: int = 9,
        abort_early: bool = True,
    ) -> None:
        super().__init__(model)
        if steps < 1 or search_steps < 1 or not c > 0 or kappa < 0 or not lr > 0:
            raise UserError(
                f"CW needs steps, search_steps >= 1, c > 0, kappa >= 0, lr > 0; got "
                f"{steps}, {search_steps}, {c}, {kappa}, {lr}"
            )
        self.c, self.kappa, self.steps, self.lr = c, kappa, steps, lr
        self.search_steps, self.abort_early = search_steps, abort_early

    def _success(self, logits, y, target):
        m = margin(logits, y, target)
        return (m > 0) & (m >= self.kappa)

    def perturb(self, x, y, target):
        n = len(x)
        w0 = torch.atanh((2 * x - 1) * 0.999999)
        lower = torch.zeros(n, device=x.device, dtype=x.dtype)
        upper = torch.full((n,), 1e10, device=x.device, dtype=x.dtype)
        const = torch.full((n,), self.c, device=x.device, dtype=x.dtype)
        best_l2 = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
        best_x = x.clone()
        check_every = max(self.steps // 10, 1)
        for _ in range(self.search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = float("inf")
            for i in range(self.steps):
                x_new = (torch.tanh(w) + 1) / 2
                l2 = _sq_l2(x_new, x)
                logits = self.model(x_new)
                f = (-margin(logits, y, target)).clamp_min(-self.kappa)
                loss = (l2 + const * f).sum()
                (w.grad,) = torch.autograd.grad(loss, w)
                opt.step()
                with torch.no_grad():
                    ok = self._success(logits, y, target)
                    found |= ok
                    better = ok & (l2 < best_l2)
                    best_l2 = torch.where(better, l2, best_l2)
                    best_x[better] = x_new.detach()[better]
                if self.abort_early and i % check_every == 0:
                    if loss.item() > prev * 0.9999:
                        break
                    prev = loss.item()
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
        return best_x


class DeepFool(Attack):
    """DeepFool (Moosavi-Dezfooli et al. 2016, arXiv 1511.04599), L2 or Linf.

    Linearise the classifier at the current point and step to the nearest linearised
    boundary among the `candidates` most likely classes: r = (|f_l| + 1e-4) w_l / ||w_l||_2^2
    (L2) or (|f_l| + 1e-4) sign(w_l) / ||w_l||_1 (Linf), with f_k = z_k - z_y, w_k its input
    gradient, l = argmin_k |f_k| / ||w_k||_q (q the dual norm). The returned point is
    x + (1 + overshoot) * sum of steps (overshoot 0.02), clipped to [0,1]; an example stops
    when its label changes (at most `steps` = 50 iterations). The label to leave is the given
    y, so an already misclassified example is returned unchanged. Untargeted only.
    """

    minimal_norm = True

    def __init__(
        self,
        model: nn.Module,
        norm: str = "l2",
        steps: int = 50,
        overshoot: float = 0.02,
        candidates: int = 10,
    ) -> None:
        super().__init__(model)
        check_choice("DeepFool norm", norm, {"l2", "linf"})
        if steps < 1 or overshoot < 0 or candidates < 2:
            raise UserError(f"DeepFool needs steps >= 1, overshoot >= 0, candidates >= 2; got "
                            f"{steps}, {overshoot}, {candidates}")
        self.norm, self.steps, self.overshoot, self.candidates = norm, steps, overshoot, candidates

    def perturb(self, x, y, target):
        if target is not None:
            raise UserError("DeepFool is untargeted; call it without target=")
        with torch.no_grad():
            logits0 = self.model(x)
        k = min(self.candidates, logits0.shape[1])
        # candidate classes: the k-1 most likely classes other than y
        others = logits0.scatter(1, y.unsqueeze(1), float("-inf")).argsort(1, descending=True)
        others = others[:, : k - 1]
        r_tot = torch.zeros_like(x)
        x_adv = x.clone()
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for it in range(self.steps + 1):
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            xi = x_adv[idx].requires_grad_(True)
            logits = self.model(xi)
            still = logits.argmax(1) == y[idx]
            active[idx] = still
            if not still.any() or it == self.steps:
                break
            z_y = logits.gather(1, y[idx].unsqueeze(1))
            f = logits.gather(1, others[idx]) - z_y  # (m, k-1), negative while y is predicted
            grads = [
                torch.autograd.grad(f[:, j].sum(), xi, retain_graph=j < f.shape[1] - 1)[0]
                for j in range(f.shape[1])
            ]
            w = torch.stack(grads, 1).flatten(2)  # (m, k-1, d)
            f = f.detach()
            dual = w.norm(p=2, dim=2) if self.norm == "l2" else w.abs().sum(2)
            dist = f.abs() / (dual + 1e-8)
            best = dist.argmin(1)
            rows = torch.arange(len(idx), device=x.device)
            w_l, f_l, n_l = w[rows, best], f[rows, best].abs(), dual[rows, best]
            if self.norm == "l2":
                r = ((f_l + 1e-4) / (n_l**2 + 1e-8)).unsqueeze(1) * w_l
            else:
                r = ((f_l + 1e-4) / (n_l + 1e-8)).unsqueeze(1) * w_l.sign()
            r = r.view_as(xi) * still.view(-1, *([1] * (x.ndim - 1)))
            r_tot[idx] += r
            x_adv[idx] = (x[idx] + (1 + self.overshoot) * r_tot[idx]).clamp(0, 1)
        return x_adv


class LBFGS(Attack):
    """Box-constrained L-BFGS attack (Szegedy et al. 2014, arXiv 1312.6199).

    Minimise c * |r|^2 + CE(f(x + r), t) subject to x + r in [0,1] with scipy's L-BFGS-B,
    and search c per example for the largest c (the smallest perturbation) whose minimiser
    still reaches the target: start at `c`, x10 while it succeeds, /10 while it fails,
    then bisect geometrically, `search_steps` searches in all. The squared L2 norm (as in
    Foolbox) is smooth at r = 0; over all c it traces the same minimisers as the norm
    (stationarity c r/|r| = 2 c' r with c = 2c'|r|).

    Vectorised: the batch is optimised jointly as one flattened vector with the summed
    objective. The objective is separable, so the joint minimiser is the per-example
    minimiser; one scipy call per search step instead of one per example.
    Untargeted (no `target=`): the target is the most likely wrong class at x, success is
    any misclassification.
    """

    minimal_norm = True
    norm = "l2"

    def __init__(
        self, model: nn.Module, c: float = 1e-2, search_steps: int = 10, max_iter: int = 100
    ) -> None:
        super().__init__(model)
        if not c > 0 or search_steps < 1 or max_iter < 1:
            raise UserError(f"LBFGS needs c > 0, search_steps >= 1, max_iter >= 1; got "
                            f"{c}, {search_steps}, {max_iter}")
        self.c, self.search_steps, self.max_iter = c, search_steps, max_iter

    def _minimise(self, x, goal, const):
        from scipy.optimize import minimize

        shape, dtype = x.shape, x.dtype

        def objective(z):
            xt = torch.from_numpy(z).to(x.device, dtype).view(shape).requires_grad_(True)
            logits = self.model(xt)
            loss = (const * _sq_l2(xt, x)).sum() + F.cross_entropy(logits, goal, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xt)
            return loss.item(), grad.detach().cpu().double().numpy().ravel()

        x0 = x.detach().cpu().double().numpy().ravel()
        bounds = np.stack([np.zeros_like(x0), np.ones_like(x0)], 1)
        res = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": self.max_iter})
        return torch.from_numpy(res.x).to(x.device, dtype).view(shape)

    def perturb(self, x, y, target):
        n = len(x)
        with torch.no_grad():
            logits0 = self.model(x)
        goal = target
        if goal is None:
            goal = logits0.scatter(1, y.unsqueeze(1), float("-inf")).argmax(1)
        const = torch.full((n,), self.c, device=x.device, dtype=x.dtype)
        lo = torch.zeros(n, device=x.device, dtype=x.dtype)
        hi = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
        best_x = x.clone()
        best_d = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
        for _ in range(self.search_steps):
            x_opt = self._minimise(x, goal, const)
            with torch.no_grad():
                ok = succeeded(self.model(x_opt), y, target)
            d = _sq_l2(x_opt, x)
            better = ok & (d < best_d)
            best_x[better], best_d[better] = x_opt[better], d[better]
            lo = torch.where(ok, torch.maximum(lo, const), lo)
            hi = torch.where(ok, hi, torch.minimum(hi, const))
            const = torch.where(
                torch.isinf(hi), const * 10,
                torch.where(lo > 0, (lo * hi).sqrt(), const / 10),
            )
        return best_x
