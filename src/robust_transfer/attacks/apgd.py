"""Auto-PGD (Croce & Hein 2020, arXiv 2003.01690): step-size-free PGD with momentum; and its
L1 version, APGD-L1 (Croce & Hein 2021, "Mind the box", arXiv 2103.01208).

Linf and L2 follow the 2020 paper's Algorithm 1 and the reference `autopgd_base.py`:
- start at a random point of the ball's surface, x + eps * t / ||t|| (Linf: t ~ U[-1,1]^d;
  L2: t ~ N(0, I)) (`ThreatModel.surface_start`);
- step size 2 * eps; momentum 0.75 (no momentum on the first step):
  z = P(x_k + eta * step(grad)),  x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}));
- checkpoints w_j = ceil(p_j * N) with p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06). At each checkpoint, per example, halve
  the step when (1) fewer than 75% of the steps since the last checkpoint increased the loss,
  or (2) the step was not halved at the last checkpoint and the best loss has not improved
  since then; halving restarts the example from its best point so far (the momentum term
  of the next step is then x_best - x_k, as in the paper and the reference code);
- the returned point is the highest-loss iterate, or any iterate that fooled the model.

L1 (the 2021 paper, Sec. 4, and the reference code's L1 branch) changes the geometry and the
schedule, not the loop:
- start: a Gaussian t ~ N(0, I) projected onto the L1 ball and the [0,1] box;
- step: x_{k+1} = P(x_k + eta * e), e = sign(grad) on the top-k coordinates by |grad| (those
  the box does not block), scaled to ||e||_1 = 1; P the exact projection onto L1 ball and
  box; no momentum (the reference's L1 branch has none);
- step size starts at eta = eps; sparsity starts at k = 20% of the d coordinates;
- every max(floor(0.04 N), 1) iterations, per example: let s = ||x_best - x||_0. Then
  k = s / 1.5 (as a fraction of d, at least one coordinate); if s shrank below 95% of its
  value at the last check, reset eta to eps and restart from x_best, else eta /= 1.5;
  eta stays within [eps / 10, eps].
AutoAttack's L1 evaluation also runs APGD on a decreasing eps schedule (3, 2, 1 x eps);
that wrapper is not included here.

All randomness comes from `ExampleRNG` (seed, example content, restart or target index), so an
example's result does not depend on the other examples in its batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.gradient import succeeded
from robust_transfer.attacks.rng import ExampleRNG
from robust_transfer.attacks.rows import Rows
from robust_transfer.attacks.threats import L1Threat, make_threat
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import predict_logits

MOMENTUM = 0.75
RHO = 0.75  # condition (1): fraction of successful steps below which the step is halved
# APGD-L1 (Croce & Hein 2021 and autopgd_base.py): initial sparsity (fraction of d), check
# period (fraction of the iterations), sparsity shrink threshold, divisor from the best
# point's sparsity to the next k, step decay factor, minimum step (as eps / L1_MIN_STEP).
L1_TOPK_INIT, L1_CHECK_EVERY, L1_SHRINK = 0.2, 0.04, 0.95
L1_TOPK_DIV, L1_STEP_DECAY, L1_MIN_STEP = 1.5, 1.5, 10.0


def checkpoints(n_iter: int) -> list[int]:
    """Iterations at which APGD may halve its step: ceil(p_j * n_iter), p as in the paper."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = {math.ceil(q * n_iter - 1e-9) for q in p[1:]}  # 1e-9: 0.57 * 100 is 57, not 58
    return sorted(m for m in marks if 1 <= m <= n_iter)


def l1_topk_count(fraction: torch.Tensor, d: int) -> torch.Tensor:
    """Number of coordinates APGD-L1 steps on for a sparsity `fraction` of d: the count of
    |grad| values at or above the ceil-ish (1 - fraction) quantile, as the reference code
    picks its threshold; between 1 and d."""
    return d - (torch.floor((1 - fraction) * d)).clamp(0, d - 1).long()


class _Rows(Rows):
    """The per-example state of one APGD run (see attacks/rows.py): an example's result is
    fixed once it is fooled (the first fooling iterate is returned), so it leaves then."""

    def leave(self, now: torch.Tensor, out: torch.Tensor, fooled: torch.Tensor) -> None:
        """Examples fooled at this iterate: record it as their result in the caller's `out`
        and `fooled` (indexed by `self.idx`), and drop their rows."""
        if now.any():
            out[self.idx[now]] = self.x_adv[now]
            fooled[self.idx[now]] = True
            self.keep(~now)

    def track(self, loss: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Keep each example's highest-loss point (and its gradient, unless this was the
        last iterate, whose gradient goes unused)."""
        improved = loss > self.loss_best
        rows = improved.view((-1,) + (1,) * (self.x_adv.ndim - 1))
        self.x_best = torch.where(rows, self.x_adv, self.x_best)
        if grad is not None:
            self.grad_best = torch.where(rows, grad, self.grad_best)
        self.loss_best = torch.where(improved, loss, self.loss_best)


class APGD(Attack):
    """APGD-CE (`loss="ce"`) or APGD-DLR (`loss="dlr"`); Linf, L2 (Croce & Hein 2020, arXiv
    2003.01690) or L1 (APGD-L1, Croce & Hein 2021, arXiv 2103.01208). Published defaults:
    100 iterations, 1 restart here (AutoAttack's standard version also uses 1 for APGD-CE).

    Targeted, `atk(x, y, target=t)`: the targeted loss (targeted DLR:
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2)); success means predicting t.
    As in the reference code, an example the model already gets wrong at x (predicts t,
    targeted) is returned unchanged without a query, and restarts run only on the examples
    not yet fooled.

    Shape: x (N, C, H, W) in [0,1], y (N,) -> (N, C, H, W).

    Example:
        x_adv = APGD(model, eps=8 / 255, norm="linf", loss="ce")(x, y)
        x_adv = APGD(model, eps=12.0, norm="l1")(x, y)
    """

    name = "apgd-ce"
    norms = ("linf", "l2", "l1")
    default_steps = 100
    supports_eot = True
    default_loss = "ce"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        norm: str = "linf",
        steps: int = 100,
        loss: str | None = None,
        restarts: int = 1,
        seed: int | None = 0,
    ) -> None:
        super().__init__(model, seed, self.default_loss if loss is None else loss)
        type(self).check_norm(norm)
        if steps < 1 or restarts < 1:
            raise UserError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
        self.threat = make_threat(norm, eps)
        self.norm, self.eps, self.steps, self.restarts = norm, float(eps), steps, restarts

    @classmethod
    def build(
        cls, model: nn.Module, eps: float, norm: str, steps: int | None = None, seed: int = 0
    ) -> APGD:
        return cls(model, eps, norm, cls.default_steps if steps is None else steps, seed=seed)

    def perturb(self, x, y, target):
        rng = ExampleRNG.for_inputs(x, self.seed)
        best_x = x.clone()
        with torch.no_grad():  # fooled already at x: returned as is (autopgd_base.py)
            logits = self.model(x)
            self.loss_fn(logits, y, target)  # a loss unfit for the model fails on any data
            fooled = succeeded(logits, y, target)
        for restart in range(self.restarts):
            idx = (~fooled).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            tgt = None if target is None else target[idx]
            best_x[idx], fooled[idx] = self.single_run(x[idx], y[idx], tgt, rng[idx], restart)
        return best_x

    def single_run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        rng: ExampleRNG,
        *counter: int,
        any_misclassification: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One APGD run: (the first fooling iterate where one fooled the model, else the
        highest-loss iterate; fooled mask). A fooled example stops there (`_Rows`).

        `rng` and `counter` (restart, target index, ...) draw each example's start. Fooled
        means predicting `target` on a targeted run, unless `any_misclassification`: then
        any label other than y counts, as in APGD-T (where the target only steers).
        """
        goal = None if any_misclassification else target
        x_adv = self.threat.surface_start(x, rng, *counter)
        out = x_adv.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        grad, logits = self.input_gradient(x_adv, y, target)
        rows = _Rows(idx=torch.arange(len(x), device=x.device), x=x, y=y, target=target,
                     goal=goal, x_adv=x_adv, grad=grad, x_best=x_adv.clone(),
                     grad_best=grad.clone(), loss_best=self.last_loss.clone())
        rows.leave(succeeded(logits, y, goal), out, fooled)
        if isinstance(self.threat, L1Threat):
            self._run_l1(rows, out, fooled)
        else:
            self._run(rows, out, fooled)
        out[rows.idx] = rows.x_best
        return out, fooled

    def _step_gradient(self, r: _Rows, last: bool) -> torch.Tensor | None:
        """Gradient (None on the `last` iterate: a forward pass only) and loss at r.x_adv;
        tracks the best point. Returns which examples it fools there."""
        if last:
            logits, grad = self.input_logits(r.x_adv, r.y, r.target), None
        else:
            grad, logits = self.input_gradient(r.x_adv, r.y, r.target)
            r.grad = grad
        r.track(self.last_loss, grad)
        return succeeded(logits, r.y, r.goal)

    def _run(self, r: _Rows, out: torch.Tensor, fooled: torch.Tensor) -> None:
        """Linf / L2: Algorithm 1 of Croce & Hein 2020 (see the module docstring)."""
        threat, n_iter = self.threat, self.steps
        n, view = len(r.idx), (-1,) + (1,) * (r.x.ndim - 1)
        r.eta = torch.full((n, *view[1:]), 2 * self.eps, device=r.x.device, dtype=r.x.dtype)
        r.loss_best_last_mark = r.loss_best.clone()
        r.reduced_last_mark = torch.ones(n, dtype=torch.bool, device=r.x.device)
        r.x_prev = r.x_adv
        r.window = [r.loss_best]  # f(x^k) since the last checkpoint: for condition (1)
        marks = set(checkpoints(n_iter))
        last_mark = 0
        for k in range(n_iter):
            if len(r.idx) == 0:
                return
            with torch.no_grad():
                z = threat.project(threat.step(r.x_adv, r.grad, r.eta), r.x)
                if k == 0:
                    x_new = z
                else:
                    x_new = threat.project(r.x_adv + MOMENTUM * (z - r.x_adv)
                                           + (1 - MOMENTUM) * (r.x_adv - r.x_prev), r.x)
                r.x_prev, r.x_adv = r.x_adv, x_new
            now = self._step_gradient(r, last=k == n_iter - 1)
            with torch.no_grad():
                r.window.append(self.last_loss)
                r.leave(now, out, fooled)
                if k + 1 in marks:
                    window = torch.stack(r.window)
                    n_up = (window[1:] > window[:-1]).sum(0)
                    cond1 = n_up < RHO * (k + 1 - last_mark)
                    cond2 = ~r.reduced_last_mark & (r.loss_best_last_mark >= r.loss_best)
                    halve = cond1 | cond2
                    r.reduced_last_mark = halve
                    r.loss_best_last_mark = r.loss_best.clone()
                    r.window = [r.window[-1]]
                    last_mark = k + 1
                    if halve.any():
                        r.eta[halve] /= 2
                        r.x_adv[halve] = r.x_best[halve]
                        r.grad[halve] = r.grad_best[halve]
                        # x_prev stays x_k: the paper's (and autopgd_base.py's) next momentum
                        # term is x_best - x_k, across the jump

    def _run_l1(self, r: _Rows, out: torch.Tensor, fooled: torch.Tensor) -> None:
        """APGD-L1 (Croce & Hein 2021): adaptive sparsity and step size, no momentum; see the
        module docstring for the schedule."""
        threat: L1Threat = self.threat  # type: ignore[assignment]
        n, d = len(r.idx), r.x[0].numel()
        view = (-1,) + (1,) * (r.x.ndim - 1)
        eta_max = self.eps
        like = {"device": r.x.device, "dtype": r.x.dtype}
        r.eta = torch.full((n, *view[1:]), eta_max, **like)
        r.topk = torch.full((n,), L1_TOPK_INIT, **like)
        r.sparsity_last = torch.full((n,), float(d), **like)
        every = max(int(L1_CHECK_EVERY * self.steps), 1)
        for k in range(self.steps):
            if len(r.idx) == 0:
                return
            with torch.no_grad():
                stepped = threat.sparse_step(r.x_adv, r.grad, r.eta, l1_topk_count(r.topk, d))
                r.x_adv = threat.project(stepped, r.x)
            now = self._step_gradient(r, last=k == self.steps - 1)
            with torch.no_grad():
                r.leave(now, out, fooled)
                if (k + 1) % every == 0:
                    sparsity = (r.x_best != r.x).flatten(1).sum(1).to(r.x.dtype)
                    shrank = sparsity / r.sparsity_last.clamp_min(1) < L1_SHRINK
                    r.topk = sparsity / d / L1_TOPK_DIV
                    r.eta = torch.where(shrank.view(view), torch.full_like(r.eta, eta_max),
                                        r.eta / L1_STEP_DECAY).clamp(eta_max / L1_MIN_STEP,
                                                                     eta_max)
                    r.sparsity_last = sparsity
                    if shrank.any():
                        r.x_adv[shrank] = r.x_best[shrank]
                        r.grad[shrank] = r.grad_best[shrank]


class APGDDLR(APGD):
    """APGD on the DLR loss (Croce & Hein 2020): `APGD(..., loss="dlr")` under its registry
    name. Same norms, defaults and shapes as `APGD`.

    Example:
        x_adv = APGDDLR(model, eps=8 / 255)(x, y)
    """

    name = "apgd-dlr"
    default_loss = "dlr"


class APGDT(Attack):
    """APGD-T (Croce & Hein 2020, arXiv 2003.01690), as in AutoAttack's standard version:
    targeted DLR loss towards each of the `n_target_classes` most likely wrong classes in
    turn (9 by default, fewer when the model has fewer classes), 100 iterations each, on
    the examples that are still robust. Untargeted in effect: `atk(x, y)`, and as in the
    reference code an example counts as broken when a run reaches any wrong class, the
    target or not. Linf, L2 or L1 (APGD-L1's geometry and schedule).

    Shape: x (N, C, H, W) in [0,1], y (N,) -> (N, C, H, W).

    Example:
        x_adv = APGDT(model, eps=8 / 255)(x, y)
    """

    name = "apgd-t"
    norms = ("linf", "l2", "l1")
    default_steps = 100
    supports_eot = True

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
        type(self).check_norm(norm)
        if n_target_classes < 1:
            raise UserError(f"n_target_classes must be >= 1, got {n_target_classes}")
        self.inner = APGD(model, eps, norm, steps, loss="dlr", restarts=1, seed=seed)
        self.norm, self.eps, self.n_target_classes = norm, float(eps), n_target_classes

    @classmethod
    def build(
        cls, model: nn.Module, eps: float, norm: str, steps: int | None = None, seed: int = 0
    ) -> APGDT:
        return cls(model, eps, norm, cls.default_steps if steps is None else steps, seed=seed)

    def set_adaptive(self, bpda: bool = False, eot_samples: int = 1) -> APGDT:
        """As `Attack.set_adaptive`; the inner APGD that takes the gradients gets them too."""
        super().set_adaptive(bpda, eot_samples)
        self.inner.set_adaptive(bpda, eot_samples)
        return self

    def perturb(self, x, y, target):
        if target is not None:
            return self.inner.perturb(x, y, target)
        logits = predict_logits(self.model, x)
        order = logits.argsort(dim=1, descending=True)
        n_classes = logits.shape[1]
        if n_classes < 4:
            raise UserError(f"APGD-T needs at least 4 classes (targeted DLR), got {n_classes}")
        rng = ExampleRNG.for_inputs(x, self.seed)
        best_x = x.clone()
        robust = logits.argmax(1) == y
        for k in range(1, min(self.n_target_classes, n_classes - 1) + 1):
            idx = robust.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            # the k-th most likely class other than the prediction (== y on robust examples)
            tgt = order[idx, k]
            # any misclassification on the way counts, not only reaching t (autopgd_base.py);
            # counter k: a fresh start per target class
            x_k, hit = self.inner.single_run(x[idx], y[idx], tgt, rng[idx], k,
                                             any_misclassification=True)
            best_x[idx[hit]] = x_k[hit]
            robust[idx[hit]] = False
        return best_x
