"""Minimal-perturbation attacks: Carlini-Wagner L2, DeepFool (L2, Linf), L-BFGS.

They search for the smallest perturbation that changes the decision, with no eps; an
evaluator compares the norm they find with each eps. An example they cannot fool comes back
unchanged. Each example is its own problem (own c search, own stopping rule, own line
search), so its result does not depend on the other examples in its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.gradient import succeeded
from robust_transfer.attacks.losses import margin
from robust_transfer.errors import UserError


def _sq_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).pow(2).sum(1)


def _take(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx]


def _steps(steps: int | None, default: int | None) -> int:
    return default if steps is None else steps


class CW(Attack):
    """Carlini & Wagner L2 attack (arXiv 1608.04644).

    x' = (tanh(w) + 1) / 2 (w initialised at arctanh(0.999999 (2x - 1)));
    minimise ||x' - x||_2^2 + c * max(z_y - max_{i!=y} z_i, -kappa) with Adam (lr 1e-2);
    targeted: max(max_{i!=t} z_i - z_t, -kappa). Binary search over c per example: start at
    1e-3, x10 until the attack succeeds, then bisect; 9 search steps; each search step runs
    up to `steps` Adam iterations (10,000 in the reference code). Returns the smallest-L2
    success per example.

    Early abort is per example: every tenth of `steps`, an example whose own loss has not
    dropped by 0.01% since the last check is frozen (no more Adam updates, so its momentum
    cannot move it either) and is no longer evaluated; the search step ends when all are
    frozen. The reference code aborts on the batch's summed loss, which makes an example's
    result depend on its neighbours. `last_iterations` holds each example's Adam updates
    over all search steps of the last call.

    Shape: x (N, C, H, W) in [0,1], y (N,) -> (N, C, H, W) in [0,1].

    Example:
        >>> x_adv = CW(model, steps=1000)(x, y)
        >>> l2 = (x_adv - x).flatten(1).norm(dim=1)
    """

    name = "cw"
    norms = ("l2",)
    minimal_norm = True
    default_steps = 10000
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

    @classmethod
    def build(
        cls, model: nn.Module, eps: float, norm: str, steps: int | None = None, seed: int = 0
    ) -> CW:
        """`steps` Adam iterations per search step; eps is unused (minimal norm), no sampling."""
        cls.check_norm(norm)
        return cls(model, steps=_steps(steps, cls.default_steps))

    def _success(self, logits, y, target):
        m = margin(logits, y, target)
        return (m > 0) & (m >= self.kappa)

    def perturb(self, x, y, target):
        n = len(x)
        beta1, beta2, adam_eps = 0.9, 0.999, 1e-8  # Adam's defaults, as in the reference
        w0 = torch.atanh((2 * x - 1) * 0.999999)
        lower = torch.zeros(n, device=x.device, dtype=x.dtype)
        upper = torch.full((n,), 1e10, device=x.device, dtype=x.dtype)
        const = torch.full((n,), self.c, device=x.device, dtype=x.dtype)
        best_l2 = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
        best_x = x.clone()
        iterations = torch.zeros(n, dtype=torch.long, device=x.device)
        check_every = max(self.steps // 10, 1)
        for _ in range(self.search_steps):
            w = w0.clone()
            m1, m2 = torch.zeros_like(w), torch.zeros_like(w)  # Adam moments per coordinate
            active = torch.ones(n, dtype=torch.bool, device=x.device)
            prev = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            for i in range(self.steps):
                idx = active.nonzero().squeeze(1)
                if len(idx) == 0:
                    break
                wi = w[idx].requires_grad_(True)
                x_new = (torch.tanh(wi) + 1) / 2
                l2 = _sq_l2(x_new, x[idx])
                logits = self.model(x_new)
                f = (-margin(logits, y[idx], _take(target, idx))).clamp_min(-self.kappa)
                loss = l2 + const[idx] * f
                (grad,) = torch.autograd.grad(loss.sum(), wi)  # separable: per-example grads
                with torch.no_grad():
                    ok = self._success(logits, y[idx], _take(target, idx))
                    found[idx] |= ok
                    better = ok & (l2 < best_l2[idx])
                    best_l2[idx[better]] = l2[better]
                    best_x[idx[better]] = x_new[better]
                    if self.abort_early and i % check_every == 0:
                        stalled = loss > prev[idx] * 0.9999
                        prev[idx] = loss
                        active[idx[stalled]] = False
                        idx, grad = idx[~stalled], grad[~stalled]
                    # Adam (Kingma & Ba 2015) on the examples still running; every one of
                    # them has taken exactly i updates, so the bias correction is shared.
                    m1[idx] = beta1 * m1[idx] + (1 - beta1) * grad
                    m2[idx] = beta2 * m2[idx] + (1 - beta2) * grad * grad
                    m_hat = m1[idx] / (1 - beta1 ** (i + 1))
                    v_hat = m2[idx] / (1 - beta2 ** (i + 1))
                    w[idx] = w[idx] - self.lr * m_hat / (v_hat.sqrt() + adam_eps)
                    iterations[idx] += 1
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
        self.last_iterations = iterations
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

    Batch-independent: each example is linearised at its own point, stops on its own label
    change and leaves the active set then (the gradients of the summed f_k are per example).

    Shape: x (N, C, H, W) in [0,1], y (N,) -> (N, C, H, W) in [0,1].

    Example:
        >>> x_adv = DeepFool(model, "l2")(x, y)
        >>> l2 = (x_adv - x).flatten(1).norm(dim=1)
    """

    name = "deepfool"
    norms = ("l2", "linf")
    minimal_norm = True
    default_steps = 50
    norm = "l2"

    def __init__(
        self,
        model: nn.Module,
        norm: str = "l2",
        steps: int = 50,
        overshoot: float = 0.02,
        candidates: int = 10,
    ) -> None:
        super().__init__(model)
        self.check_norm(norm)
        if steps < 1 or overshoot < 0 or candidates < 2:
            raise UserError(f"DeepFool needs steps >= 1, overshoot >= 0, candidates >= 2; got "
                            f"{steps}, {overshoot}, {candidates}")
        self.norm, self.steps, self.overshoot, self.candidates = norm, steps, overshoot, candidates

    @classmethod
    def build(
        cls, model: nn.Module, eps: float, norm: str, steps: int | None = None, seed: int = 0
    ) -> DeepFool:
        """`steps` linearisations in `norm`; eps is unused (minimal norm), no sampling."""
        return cls(model, norm, steps=_steps(steps, cls.default_steps))

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


# Objective over a subset of a batch's problems: (points (k, d), row indices (k,)) ->
# (values (k,), gradients (k, d)), detached.
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _two_loop(q: torch.Tensor, s: torch.Tensor, y: torch.Tensor, valid: torch.Tensor
              ) -> torch.Tensor:
    """H q for each row: L-BFGS's two-loop recursion (Nocedal 1980), batched.

    q (k, d); s, y (k, m, d) the last m steps and gradient changes, oldest first, with
    `valid` (k, m) marking stored pairs (an example's pairs sit at the end). H0 = gamma I
    with gamma = s'y / y'y of the newest pair (Nocedal & Wright, eq. 7.20).
    """
    sy = (s * y).sum(2)
    rho = torch.where(valid, 1 / torch.where(valid, sy, torch.ones_like(sy)), 0.0)
    alpha = torch.zeros_like(rho)
    q = q.clone()
    for j in reversed(range(s.shape[1])):
        alpha[:, j] = rho[:, j] * (s[:, j] * q).sum(1)
        q = q - alpha[:, j, None] * y[:, j]
    yy = y[:, -1].pow(2).sum(1)
    gamma = torch.where(valid[:, -1], sy[:, -1] / yy.clamp_min(1e-30), 1.0)
    r = gamma[:, None] * q
    for j in range(s.shape[1]):
        beta = rho[:, j] * (y[:, j] * r).sum(1)
        r = r + (alpha[:, j] - beta)[:, None] * s[:, j]
    return r


def box_lbfgs(
    objective: Objective,
    z0: torch.Tensor,
    max_iter: int,
    history: int = 10,
    max_ls: int = 20,
    pgtol: float = 1e-5,
    ftol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise N independent problems over the box [0,1]^d with a batched projected L-BFGS.

    Each row of z0 (N, d) is its own problem with its own history of the last `history`
    (s, y) pairs, direction, step and stopping rule; rows are only stacked to share the
    model's forward and backward passes. One iteration, per row: coordinates at a bound whose
    gradient points out of the box are held fixed (L-BFGS-B's active set; Byrd, Lu, Nocedal
    & Zhu 1995), the two-loop direction is taken on the free ones (projected quasi-Newton as in
    Kim, Sra & Dhillon 2010), then a backtracking Armijo search along the projected path
    P(z + a d), a = 1 (1/|d| without history), halved up to `max_ls` times. A row stops at
    L-BFGS-B's tests (projected gradient inf-norm <= `pgtol`, relative decrease of an
    iteration <= `ftol`), after `max_iter` iterations, or when its line search fails twice in
    a row (the first failure drops its history and retries along the gradient). Stopped rows
    are no longer evaluated.

    `ftol` (None: max(2.2e-9, 100 eps of z's dtype)) is scipy's 2.2e-9 in float64 but 1.2e-5
    in float32: a float32 model's value is resolved to ~1e-7 relative only, and its last
    bits change with the batch size (its kernels differ), so iterations that gain less are
    decided by rounding. With scipy's value they made L-BFGS attack results depend on the
    batch by up to 1e-3 per pixel; stopping there moved the median minimal norm by < 0.1%.

    Returns (z (N, d), iterations per row).
    """
    n = len(z0)
    if ftol is None:
        ftol = max(2.2e-9, 100 * torch.finfo(z0.dtype).eps)
    rows = torch.arange(n, device=z0.device)
    z = z0.clamp(0, 1).clone()
    f, g = objective(z, rows)
    s_hist = z.new_zeros(n, history, z.shape[1])
    y_hist = z.new_zeros(n, history, z.shape[1])
    valid = torch.zeros(n, history, dtype=torch.bool, device=z.device)
    active = torch.ones(n, dtype=torch.bool, device=z.device)
    iterations = torch.zeros(n, dtype=torch.long, device=z.device)
    for _ in range(max_iter):
        # scipy's projected gradient P(z - g) - z: zero exactly at a box-KKT point
        pg = (z - g).clamp(0, 1) - z
        active &= pg.abs().amax(1) > pgtol
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        za, fa, ga = z[idx], f[idx], g[idx]
        free = ~(((za <= 0) & (ga > 0)) | ((za >= 1) & (ga < 0)))
        g_free = ga * free
        d = -_two_loop(g_free, s_hist[idx], y_hist[idx], valid[idx]) * free
        slope = (d * g_free).sum(1)
        bad = ~(slope < 0)  # not a descent direction (numerically): fall back to -gradient
        d = torch.where(bad[:, None], -g_free, d)
        fresh = bad | ~valid[idx].any(1)
        step = torch.where(fresh, 1 / d.norm(dim=1).clamp_min(1e-12), 1.0)
        z_new, f_new, g_new = za.clone(), fa.clone(), ga.clone()
        accepted = torch.zeros(len(idx), dtype=torch.bool, device=z.device)
        pending = torch.arange(len(idx), device=z.device)
        for _ in range(max_ls):
            trial = (za[pending] + step[pending, None] * d[pending]).clamp(0, 1)
            f_t, g_t = objective(trial, idx[pending])
            decrease = (ga[pending] * (trial - za[pending])).sum(1)
            ok = torch.isfinite(f_t) & (f_t <= fa[pending] + 1e-4 * decrease) & (decrease < 0)
            hit = pending[ok]
            z_new[hit], f_new[hit], g_new[hit] = trial[ok], f_t[ok], g_t[ok]
            accepted[hit] = True
            pending = pending[~ok]
            if len(pending) == 0:
                break
            step[pending] = step[pending] / 2
        # a failed search: retry once along the gradient with an empty history, else stop
        failed = ~accepted
        had_history = valid[idx].any(1)
        valid[idx[failed]] = False
        active[idx[failed & ~had_history]] = False
        iterations[idx[accepted]] += 1
        # curvature pair, kept only where s'y > eps |y|^2 (as L-BFGS-B does)
        s_new, y_new = z_new - za, g_new - ga
        sy = (s_new * y_new).sum(1)
        keep = accepted & (sy > torch.finfo(z.dtype).eps * y_new.pow(2).sum(1))
        shift = idx[keep]
        s_hist[shift] = torch.cat([s_hist[shift, 1:], s_new[keep, None]], 1)
        y_hist[shift] = torch.cat([y_hist[shift, 1:], y_new[keep, None]], 1)
        valid[shift] = torch.cat([valid[shift, 1:], valid.new_ones(len(shift), 1)], 1)
        z[idx], f[idx], g[idx] = z_new, f_new, g_new
        scale = torch.maximum(torch.maximum(fa.abs(), f_new.abs()), torch.ones_like(fa))
        active[idx[accepted & ((fa - f_new) <= ftol * scale)]] = False
    return z, iterations


class LBFGS(Attack):
    """Box-constrained L-BFGS attack (Szegedy et al. 2014, arXiv 1312.6199).

    Minimise c * |r|^2 + CE(f(x + r), t) subject to x + r in [0,1] with a box-constrained
    L-BFGS (`box_lbfgs`: projected L-BFGS with L-BFGS-B's active set, m = 10 pairs, at most
    `max_iter` iterations), and search c per example for the largest c (the smallest
    perturbation) whose minimiser still reaches the target: start at `c`, x10 while it
    succeeds, /10 while it fails, then bisect geometrically, `search_steps` searches in all.
    The squared L2 norm (as in Foolbox) is smooth at r = 0; over all c it traces the same
    minimisers as the norm (stationarity c r/|r| = 2 c' r with c = 2c'|r|).

    Every example is an independent problem with its own c, history, line search and
    stopping rule, solved batched in torch: its result does not depend on its batch (the
    earlier joint scipy solve of the summed objective shared one line search and one
    stopping rule across the batch). Untargeted (no `target=`): the target is the most likely
    wrong class at x, success is any misclassification. `last_iterations` holds each
    example's L-BFGS iterations over all search steps of the last call.

    Shape: x (N, C, H, W) in [0,1], y (N,) -> (N, C, H, W) in [0,1].

    Example:
        >>> x_adv = LBFGS(model, max_iter=100)(x, y)
        >>> l2 = (x_adv - x).flatten(1).norm(dim=1)
    """

    name = "lbfgs"
    norms = ("l2",)
    minimal_norm = True
    default_steps = 100
    norm = "l2"

    def __init__(
        self, model: nn.Module, c: float = 1e-2, search_steps: int = 10, max_iter: int = 100
    ) -> None:
        super().__init__(model)
        if not c > 0 or search_steps < 1 or max_iter < 1:
            raise UserError(f"LBFGS needs c > 0, search_steps >= 1, max_iter >= 1; got "
                            f"{c}, {search_steps}, {max_iter}")
        self.c, self.search_steps, self.max_iter = c, search_steps, max_iter

    @classmethod
    def build(
        cls, model: nn.Module, eps: float, norm: str, steps: int | None = None, seed: int = 0
    ) -> LBFGS:
        """`steps` L-BFGS iterations per c; eps is unused (minimal norm), no sampling."""
        cls.check_norm(norm)
        return cls(model, max_iter=_steps(steps, cls.default_steps))

    def _minimise(self, x: torch.Tensor, goal: torch.Tensor, const: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape[1:]

        def objective(z: torch.Tensor, rows: torch.Tensor):
            xt = z.view(-1, *shape).requires_grad_(True)
            logits = self.model(xt)
            value = const[rows] * _sq_l2(xt, x[rows]) + F.cross_entropy(
                logits, goal[rows], reduction="none")
            (grad,) = torch.autograd.grad(value.sum(), xt)  # separable: per-row gradients
            return value.detach(), grad.flatten(1)

        z, iterations = box_lbfgs(objective, x.flatten(1), self.max_iter)
        return z.view_as(x), iterations

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
        iterations = torch.zeros(n, dtype=torch.long, device=x.device)
        for _ in range(self.search_steps):
            x_opt, its = self._minimise(x, goal, const)
            iterations += its
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
        self.last_iterations = iterations
        return best_x
