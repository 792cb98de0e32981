"""FAB and FAB-T (Croce & Hein 2020, ICML, arXiv 1907.02044): minimally distorted adversarial
examples with a fast adaptive boundary attack, Linf / L2 / L1.

Each iteration linearises the decision boundary at the current point x_k: f = z_t - z_c and
w = grad_x f define the hyperplane {z : w.(z - x_k) + f = 0}. FAB projects both x_k and the
original point x onto that hyperplane intersected with the box [0,1]^d (minimal p-norm,
`project_hyperplane_box`), giving steps d_k and d_0, and moves to

    x_{k+1} = clip((1 - alpha) (x_k + eta d_k) + alpha (x + eta d_0), 0, 1),
    alpha = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max),

so the iterate heads for the boundary while staying biased toward x (alpha_max = 0.1) with
a small extrapolation past it (eta = 1.05). Once x_{k+1} is adversarial it is recorded if it
is the smallest so far, and the iterate steps back toward x: x + beta (x_{k+1} - x) with
beta = 0.9, so the attack then tracks the boundary inward. The structure (success checked
by a separate forward pass, restarts, targets in order of the clean logits) follows
AutoAttack's `fab_pt.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.gradient import succeeded
from robust_transfer.attacks.rng import ExampleRNG
from robust_transfer.attacks.rows import Rows
from robust_transfer.errors import UserError

# Radius scale of the random restarts when no eps is given (AutoAttack's FAB defaults).
DEFAULT_EPS = {"linf": 0.3, "l2": 1.0, "l1": 5.0}
_DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}  # the dual norm of each norm


def _norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """p-norm over the last dimension: (M, D) -> (M,), (M, K, D) -> (M, K)."""
    if norm == "linf":
        return t.abs().amax(-1)
    if norm == "l2":
        return t.norm(dim=-1)
    return t.abs().sum(-1)


def project_hyperplane_box(p: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                           norm: str) -> torch.Tensor:
    """Minimal-norm step d per row with w.(p + d) = b and p + d in [0,1]^D (FAB, Sec. 3.1).

    `p`, `w`: (M, D); `b`: (M,). Let c = b - w.p be the required change of w.z. The optimal
    d moves each coordinate along sign(c w_i) by e_i in [0, m_i] (m_i the room the box
    leaves on that side) with sum_i |w_i| e_i = |c|:

    - L2: e_i = min(lam |w_i|, m_i) (KKT); Linf: e_i = min(lam, m_i) where w_i != 0.
      g(lam) = sum_i |w_i| e_i(lam) is piecewise linear and increasing with kinks at
      lam_i = m_i / a_i (a_i = |w_i| or 1): sort the kinks, evaluate g at each with cumulative
      sums and solve g(lam) = |c| on the right piece.
    - L1: a linear programme; fill coordinates in decreasing |w_i| up to their room until
      |c| is reached (sort + cumulative sum), the last one partly.

    Where the hyperplane misses the box (sum_i |w_i| m_i < |c|), the step goes to the box
    corner that gets closest to it (every coordinate with w_i != 0 moved to its bound).
    """
    c = b - (w * p).sum(1)
    direction = torch.where(c >= 0, 1.0, -1.0).to(p).unsqueeze(1) * w.sign()
    room = torch.where(direction > 0, 1 - p, torch.where(direction < 0, p, 0.0)).clamp_min(0)
    r = w.abs()
    need = c.abs().unsqueeze(1)  # (M, 1)
    rm = r * room
    feasible = rm.sum(1, keepdim=True) >= need
    if norm == "l1":
        r_sorted, order = r.sort(dim=1, descending=True)
        rm_sorted = rm.gather(1, order)
        filled = rm_sorted.cumsum(1)
        k = (filled < need).sum(1, keepdim=True)  # coordinates filled to their room
        before = torch.cat([torch.zeros_like(need), filled], 1).gather(1, k)
        k_safe = k.clamp(max=r.shape[1] - 1)
        partial = (need - before) / r_sorted.gather(1, k_safe).clamp_min(1e-30)
        pos = torch.arange(r.shape[1], device=p.device).unsqueeze(0)
        e_sorted = torch.where(pos < k, room.gather(1, order),
                               torch.where(pos == k, partial, torch.zeros_like(p)))
        e = torch.zeros_like(p).scatter(1, order, e_sorted)
    else:
        a = r if norm == "l2" else (r > 0).to(p)
        kink = torch.where(a > 0, room / a.clamp_min(1e-30), torch.full_like(p, float("inf")))
        kink, order = kink.sort(dim=1)
        ra = (r * a).gather(1, order)
        # clipped mass up to and including each kink; active slope strictly after it
        clipped = rm.gather(1, order).cumsum(1)
        after = ra.flip(1).cumsum(1).flip(1) - ra  # sum over later kinks (exact 0 at the tail)
        g = clipped + torch.where(after > 0, kink * after, torch.zeros_like(p))
        k = (g < need).sum(1, keepdim=True)  # kinks passed before g reaches |c|
        clipped0 = torch.cat([torch.zeros_like(need), clipped], 1).gather(1, k)
        slope = torch.cat([ra.sum(1, keepdim=True), after], 1).gather(1, k)
        lam = ((need - clipped0) / slope.clamp_min(1e-30)).clamp_min(0)
        e = torch.minimum(lam * a, room)
    e = torch.where(feasible, e, torch.where(r > 0, room, torch.zeros_like(p)))
    return direction * e


class FAB(Attack):
    """Fast Adaptive Boundary attack (Croce & Hein 2020, ICML, arXiv 1907.02044): the smallest
    Linf, L2 or L1 perturbation that changes the decision, found by iterated projections onto
    the linearised boundary intersected with the box (see the module docstring).

    Untargeted, `atk(x, y)`: at each iterate the hyperplane is that of the closest other class,
    l = argmin_{j != y} |z_j - z_y| / ||grad(z_j - z_y)||_q (q the dual norm); one backward
    pass per class and a (K, D) Jacobian per example, so for many classes prefer FAB-T.
    Targeted, `atk(x, y, target=t)`: the hyperplane between t and its strongest
    rival max_{i != t} z_i (that is y while y is predicted), one backward pass; success means
    predicting t. Each example keeps its smallest successful perturbation over all iterations
    and restarts; one never fooled (or already fooled at x) comes back unchanged.

    Restarts: the first run starts at x (AutoAttack's default is 1 run); each later one starts
    on the p-sphere of radius min(best norm so far, eps) / 2 around x (per-example random
    streams, so results do not depend on the batch). `eps` sets that radius (None:
    AutoAttack's 0.3 / 1.0 / 5.0 for Linf / L2 / L1). With `stop_at_eps` it is also a
    budget: as in AutoAttack's `fab_pt.py`, a later restart (FAB-T: a later target) runs only
    on the examples with no perturbation of norm <= eps yet, and beyond it a run stops on an
    example as soon as it has one. The result is the smallest norm found where that exceeds
    eps, else some perturbation within eps: the evaluator's question (which examples break
    within eps) gets the same answer as from a full search (`stop_norm` says so). `build`
    (the registry, hence `evaluate`) passes the evaluator's eps with `stop_at_eps`; the
    constructor's default searches on.

    Shape:
        x: (N, C, H, W) in [0, 1]; y, target: (N,) class indices; returns (N, C, H, W).

    Example:
        >>> atk = FAB(model, norm="l2", steps=100)
        >>> x_adv = atk(x, y)
    """

    name = "fab"
    norms = ("linf", "l2", "l1")
    minimal_norm = True
    default_steps = 100

    def __init__(
        self,
        model: nn.Module,
        norm: str = "linf",
        steps: int = 100,
        n_restarts: int = 1,
        eps: float | None = None,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int | None = 0,
        stop_at_eps: bool = False,
    ) -> None:
        super().__init__(model, seed)
        self.check_norm(norm)
        if steps < 1 or n_restarts < 1:
            raise UserError(f"FAB needs steps >= 1 and n_restarts >= 1, got {steps}, {n_restarts}")
        if eps is not None and not eps > 0:
            raise UserError(f"FAB's restart radius eps must be > 0 (or None), got {eps}")
        if not (0 <= alpha_max <= 1 and eta >= 1 and 0 < beta <= 1):
            raise UserError(f"FAB needs 0 <= alpha_max <= 1, eta >= 1, 0 < beta <= 1; got "
                            f"{alpha_max}, {eta}, {beta}")
        self.norm, self.steps, self.n_restarts = norm, steps, n_restarts
        self.eps = DEFAULT_EPS[norm] if eps is None else float(eps)
        self.stop_norm = self.eps if stop_at_eps else None
        self.alpha_max, self.eta, self.beta = alpha_max, eta, beta

    @classmethod
    def build(cls, model: nn.Module, eps: float, norm: str, steps: int | None = None,
              seed: int = 0) -> FAB:
        """The evaluator compares FAB's norms with eps afterwards; eps (if > 0) is the restart
        radius and, as in AutoAttack, the norm below which an example needs no further
        restart or target (`stop_at_eps`)."""
        cls.check_norm(norm)
        return cls(model, norm, steps or cls.default_steps, eps=eps if eps > 0 else None,
                   seed=seed, stop_at_eps=eps > 0)

    def _open(self, best: torch.Tensor) -> torch.Tensor:
        """Indices of the examples that still need work: all, or with `stop_norm` those
        whose smallest norm so far exceeds it."""
        if self.stop_norm is None:
            return torch.arange(len(best), device=best.device)
        return (best > self.stop_norm).nonzero().squeeze(1)

    # --- one linearisation -------------------------------------------------------------

    def _boundary(self, x1: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                  rival_is_y: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, w): value (M,) and input gradient (M, D) of the linearised boundary at x1."""
        x1 = x1.detach().requires_grad_(True)
        logits = self.model(x1)
        rows = torch.arange(len(x1), device=x1.device)
        if target is not None:
            if rival_is_y:  # AutoAttack's FAB-T: the boundary between t and the true class
                rival = y
            else:
                rival = logits.detach().scatter(1, target.unsqueeze(1), float("-inf")).argmax(1)
            f = logits[rows, target] - logits[rows, rival]
            (w,) = torch.autograd.grad(f.sum(), x1)
            return f.detach(), w.flatten(1)
        n_classes = logits.shape[1]
        grads = torch.stack([
            torch.autograd.grad(logits[:, j].sum(), x1, retain_graph=j < n_classes - 1)[0]
            for j in range(n_classes)
        ], 1).flatten(2)  # (M, K, D): the Jacobian rows
        df = (logits - logits[rows, y].unsqueeze(1)).detach()
        dg = grads - grads[rows, y].unsqueeze(1)
        dist = df.abs() / (_norm(dg, _DUAL[self.norm]) + 1e-12)
        dist[rows, y] = float("inf")
        closest = dist.argmin(1)
        return df[rows, closest], dg[rows, closest]

    # --- one run from one start ----------------------------------------------------------

    def _run(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
             goal: torch.Tensor | None, start: torch.Tensor,
             rival_is_y: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`steps` FAB iterations from `start`: (smallest fooling point, its norm), the norm
        inf (and the point x) where no iterate succeeded. With `stop_norm`, an example leaves
        once it has a point within it (attacks/rows.py): the rest of the run could only
        shrink that norm further, which the caller does not ask for."""
        n = len(x)
        view = (-1,) + (1,) * (x.ndim - 1)
        out_x = x.clone()
        out = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
        r = Rows(idx=torch.arange(n, device=x.device), x=x, x_flat=x.flatten(1), y=y,
                 target=target, goal=goal, x1=start.clone(), best_x=x.clone(), best=out.clone())
        for _ in range(self.steps):
            if len(r.idx) == 0:
                break
            f, w = self._boundary(r.x1, r.y, r.target, rival_is_y)
            with torch.no_grad():
                m, x1_flat = len(r.idx), r.x1.flatten(1)
                b = (w * x1_flat).sum(1) - f  # the hyperplane {z : w.z = b}
                d = project_hyperplane_box(torch.cat([x1_flat, r.x_flat]), torch.cat([w, w]),
                                           torch.cat([b, b]), self.norm)
                size = _norm(d, self.norm).clamp_min(1e-8)
                d1, d0, s1, s0 = d[:m], d[m:], size[:m], size[m:]
                alpha = (s1 / (s1 + s0)).clamp(0, self.alpha_max).unsqueeze(1)
                x1_flat = ((1 - alpha) * (x1_flat + self.eta * d1)
                           + alpha * (r.x_flat + self.eta * d0)).clamp(0, 1)
                x1 = x1_flat.view_as(r.x)
                ok = succeeded(self.model(x1), r.y, r.goal)
                dist = _norm(x1_flat - r.x_flat, self.norm)
                better = ok & (dist < r.best)
                r.best = torch.where(better, dist, r.best)
                r.best_x = torch.where(better.view(view), x1, r.best_x)
                r.x1 = torch.where(ok.view(view), r.x + self.beta * (x1 - r.x), x1)
                if self.stop_norm is not None:
                    done = r.best <= self.stop_norm
                    if done.any():
                        out_x[r.idx[done]], out[r.idx[done]] = r.best_x[done], r.best[done]
                        r.keep(~done)
        out_x[r.idx], out[r.idx] = r.best_x, r.best
        return out_x, out

    def _random_start(self, x: torch.Tensor, radius: torch.Tensor, rng: ExampleRNG,
                      *counter: int) -> torch.Tensor:
        """A point on the p-sphere of `radius` (N,) around x, clipped to the box."""
        shape = tuple(x.shape[1:])
        if self.norm == "linf":
            t = 2 * rng.uniform(shape, *counter, dtype=x.dtype) - 1
        else:
            t = rng.normal(shape, *counter, dtype=x.dtype)
        t = t.flatten(1)
        t = t / _norm(t, self.norm).clamp_min(1e-12).unsqueeze(1)
        return (x + (radius.unsqueeze(1) * t).view_as(x)).clamp(0, 1)

    def _restarts(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                  goal: torch.Tensor | None, rng: ExampleRNG, tag: int,
                  rival_is_y: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """All restarts on the same examples: (smallest fooling point, its norm)."""
        for r in range(self.n_restarts):
            if r == 0:  # from x, on every example
                best_x, best = self._run(x, y, target, goal, x, rival_is_y)
                continue
            idx = self._open(best)
            if len(idx) == 0:
                break
            radius = best[idx].clamp(max=self.eps) / 2
            start = self._random_start(x[idx], radius, rng[idx], tag, r)
            x_r, size_r = self._run(x[idx], y[idx], None if target is None else target[idx],
                                    None if goal is None else goal[idx], start, rival_is_y)
            better = size_r < best[idx]
            best[idx[better]], best_x[idx[better]] = size_r[better], x_r[better]
        return best_x, best

    def perturb(self, x, y, target):
        with torch.no_grad():
            pred = self.model(x).argmax(1)
        # already fooled at x: nothing to do (norm 0), returned unchanged
        todo = (pred == y) if target is None else (pred != target)
        x_adv = x.clone()
        idx = todo.nonzero().squeeze(1)
        if len(idx) == 0:
            return x_adv
        rng = ExampleRNG.for_inputs(x, self.seed)[idx]
        tgt = None if target is None else target[idx]
        x_adv[idx], _ = self._restarts(x[idx], y[idx], tgt, tgt, rng, 0)
        return x_adv


class FABT(FAB):
    """FAB-T, AutoAttack's targeted FAB (Croce & Hein 2020, arXiv 2003.01690 and 1907.02044):
    untargeted in effect, `atk(x, y)`. For each of the `n_target_classes` most likely classes
    other than y at x (9 by default, fewer when the model has fewer classes), in turn, run
    targeted FAB (`steps` iterations, `n_restarts` runs) with the hyperplane between that
    target and y, one backward pass per iteration; success is any misclassification.

    By default every target runs on every clean-correct example and each keeps its smallest
    perturbation over all targets: a minimal-norm attack reports the smallest norm it can
    find. With `stop_at_eps` (as `build`, hence `evaluate`), AutoAttack's rule: a further
    target runs only on the examples no target has broken within eps. Called with
    `target=t`, FAB-T is targeted FAB toward t.

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,) class indices; returns (N, C, H, W).

    Example:
        >>> atk = FABT(model, norm="linf", n_target_classes=9)
        >>> x_adv = atk(x, y)
    """

    name = "fab-t"

    def __init__(
        self,
        model: nn.Module,
        norm: str = "linf",
        steps: int = 100,
        n_restarts: int = 1,
        n_target_classes: int = 9,
        eps: float | None = None,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int | None = 0,
        stop_at_eps: bool = False,
    ) -> None:
        super().__init__(model, norm, steps, n_restarts, eps, alpha_max, eta, beta, seed,
                         stop_at_eps)
        if n_target_classes < 1:
            raise UserError(f"FAB-T needs n_target_classes >= 1, got {n_target_classes}")
        self.n_target_classes = n_target_classes

    def perturb(self, x, y, target):
        if target is not None:
            return super().perturb(x, y, target)
        with torch.no_grad():
            logits = self.model(x)
        x_adv = x.clone()
        idx = (logits.argmax(1) == y).nonzero().squeeze(1)
        if len(idx) == 0:
            return x_adv
        order = logits[idx].argsort(1, descending=True)  # column 0 is y on these examples
        rng = ExampleRNG.for_inputs(x, self.seed)[idx]
        xs, ys = x[idx], y[idx]
        best_x = xs.clone()
        best = torch.full((len(idx),), float("inf"), device=x.device, dtype=x.dtype)
        for k in range(1, min(self.n_target_classes, logits.shape[1] - 1) + 1):
            sub = self._open(best)
            if len(sub) == 0:
                break
            x_k, size_k = self._restarts(xs[sub], ys[sub], order[sub, k], None, rng[sub], k,
                                         rival_is_y=True)
            better = size_k < best[sub]
            best[sub[better]], best_x[sub[better]] = size_k[better], x_k[better]
        x_adv[idx] = best_x
        return x_adv
