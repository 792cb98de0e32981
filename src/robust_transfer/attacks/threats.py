"""Threat models as small strategy objects: random start, ascent step, projection.

After MadryLab's `attack_steps.py`: adding a norm is adding one class. Every method keeps
the result inside [0,1]; `project` also keeps it inside the eps-ball around the clean input.
"""

from __future__ import annotations

import torch

from robust_transfer.errors import UserError, check_choice


def _rand(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _per_example_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """Norm of each example, shaped (N, 1, 1, 1) for broadcasting."""
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.ndim - 1)))


class ThreatModel:
    """The set of allowed inputs: the eps-ball of one norm around x, intersected with [0,1]."""

    norm: str = ""

    def __init__(self, eps: float) -> None:
        if not eps >= 0:  # also rejects NaN
            raise UserError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None):
        raise NotImplementedError

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        """One ascent step of size `alpha` along `grad`, steepest for this norm."""
        raise NotImplementedError

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example perturbation size in this norm, shape (N,)."""
        return _per_example_norm(x_adv - x, self.p).flatten()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"


class LinfThreat(ThreatModel):
    norm, p = "linf", float("inf")

    def random_start(self, x, generator=None):
        noise = (2 * _rand(x.shape, x, generator) - 1) * self.eps
        return (x + noise).clamp(0, 1)

    def step(self, x_adv, grad, alpha):
        return x_adv + alpha * grad.sign()

    def project(self, x_adv, x):
        return (x + (x_adv - x).clamp(-self.eps, self.eps)).clamp(0, 1)


class L2Threat(ThreatModel):
    norm, p = "l2", 2.0

    def random_start(self, x, generator=None):
        # Uniform in the ball: Gaussian direction, radius eps * U^(1/d).
        direction = _randn(x.shape, x, generator)
        direction = direction / _per_example_norm(direction, 2).clamp_min(1e-12)
        d = x[0].numel()
        radius = self.eps * _rand((len(x),) + (1,) * (x.ndim - 1), x, generator) ** (1.0 / d)
        return (x + direction * radius).clamp(0, 1)

    def step(self, x_adv, grad, alpha):
        return x_adv + alpha * grad / _per_example_norm(grad, 2).clamp_min(1e-12)

    def project(self, x_adv, x):
        delta = x_adv - x
        scale = (self.eps / _per_example_norm(delta, 2).clamp_min(1e-12)).clamp(max=1.0)
        # Clamping to [0,1] moves each coordinate toward x, so the norm stays <= eps.
        return (x + delta * scale).clamp(0, 1)


def project_l1_box(
    z: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, eps: float
) -> torch.Tensor:
    """Exact Euclidean projection of each row of `z` onto {d : ||d||_1 <= eps, lower <= d <= upper}.

    Needs lower <= 0 <= upper (the box contains the origin, as [0,1] - x does). The problem
    separates given the L1 multiplier lam >= 0: d_i = sign(z_i) * clip(|z_i| - lam, 0, cap_i),
    cap_i the box bound on z_i's side. s(lam) = sum_i clip(|z_i| - lam, 0, cap_i) is piecewise
    linear and non-increasing, with kinks at |z_i| - cap_i (coordinate leaves its cap, slope
    -1) and |z_i| (coordinate reaches 0, slope +1): sort the kinks, walk the pieces with
    cumulative sums and solve s(lam) = eps on the right piece. O(d log d) per row, batched;
    this is the projection APGD-L1 (Croce & Hein 2021, arXiv 2103.01208) uses. Rescaling
    d * eps / ||d||_1 is not a projection.
    """
    shape = z.shape
    z, lower, upper = z.flatten(1), lower.flatten(1), upper.flatten(1)
    a = z.abs()
    cap = torch.where(z >= 0, upper, -lower).clamp_min(0)
    total0 = torch.minimum(a, cap).sum(1)  # s(0)
    kinks = torch.cat([(a - cap).clamp_min(0), a], dim=1)
    slopes = torch.cat([-torch.ones_like(a), torch.ones_like(a)], dim=1)
    kinks, order = kinks.sort(dim=1)
    slopes = slopes.gather(1, order)
    # Slope of s on the piece that starts at each kink, and s at each kink.
    slope_after = slopes.cumsum(1)
    widths = torch.diff(kinks, dim=1, prepend=torch.zeros_like(kinks[:, :1]))
    slope_before = torch.cat([torch.zeros_like(slope_after[:, :1]), slope_after[:, :-1]], 1)
    s_at = total0.unsqueeze(1) + (slope_before * widths).cumsum(1)
    # First kink where s <= eps; lam lies on the piece just before it.
    j = (s_at > eps).sum(1, keepdim=True).clamp(max=kinks.shape[1] - 1)
    k_prev = (j - 1).clamp_min(0)
    start = torch.where(j > 0, kinks.gather(1, k_prev), torch.zeros_like(j, dtype=z.dtype))
    s_start = torch.where(j > 0, s_at.gather(1, k_prev), total0.unsqueeze(1))
    slope = slope_before.gather(1, j)
    lam = start + (s_start - eps) / (-slope).clamp_min(1e-12)
    lam = torch.where(total0.unsqueeze(1) > eps, lam, torch.zeros_like(lam))
    d = z.sign() * torch.minimum((a - lam).clamp_min(0), cap)
    return d.view(shape)


class L1Threat(ThreatModel):
    """L1 ball: sparse steps on the top-`sparsity` fraction of coordinates by |grad| and the
    exact projection onto the L1 ball intersected with the [0,1] box (APGD-L1, Croce & Hein
    2021, arXiv 2103.01208; sparse L1 descent, Tramer & Boneh 2019, arXiv 1904.13000)."""

    norm, p = "l1", 1.0

    def __init__(self, eps: float, sparsity: float = 0.05) -> None:
        super().__init__(eps)
        if not 0 < sparsity <= 1:
            raise UserError(f"L1 step sparsity must be in (0, 1], got {sparsity}")
        self.sparsity = float(sparsity)

    def random_start(self, x, generator=None):
        # Uniform in the L1 ball: Laplace direction on the L1 sphere, radius eps * U^(1/d);
        # clamping to the box only shrinks |delta_i|, so it stays in the ball.
        exp = -torch.log(_rand(x.shape, x, generator).clamp_min(1e-12))
        sign = torch.where(_rand(x.shape, x, generator) < 0.5, -1.0, 1.0).to(x.dtype)
        direction = sign * exp / _per_example_norm(exp, 1).clamp_min(1e-12)
        d = x[0].numel()
        radius = self.eps * _rand((len(x),) + (1,) * (x.ndim - 1), x, generator) ** (1.0 / d)
        return (x + direction * radius).clamp(0, 1)

    def step(self, x_adv, grad, alpha):
        # Coordinates that the box already stops from moving along the gradient sign get no
        # share of the step (as in APGD-L1); then the top-q of the rest by |grad|.
        blocked = ((x_adv <= 0) & (grad < 0)) | ((x_adv >= 1) & (grad > 0))
        g = torch.where(blocked, torch.zeros_like(grad), grad).flatten(1)
        k = max(1, int(round(self.sparsity * g.shape[1])))
        threshold = g.abs().topk(k, dim=1).values[:, -1:]
        e = torch.where((g.abs() >= threshold) & (g != 0), g.sign(), torch.zeros_like(g))
        e = e / e.abs().sum(1, keepdim=True).clamp_min(1)
        return x_adv + alpha * e.view_as(x_adv)

    def project(self, x_adv, x):
        delta = project_l1_box(x_adv - x, -x, 1 - x, self.eps)
        return (x + delta).clamp(0, 1)

    def __repr__(self) -> str:
        return f"L1Threat(eps={self.eps}, sparsity={self.sparsity})"


NORMS: dict[str, type[ThreatModel]] = {"linf": LinfThreat, "l2": L2Threat, "l1": L1Threat}


def make_threat(norm: str, eps: float) -> ThreatModel:
    """The threat model for `norm` ("linf", "l2", ...) with radius `eps`."""
    check_choice("norm", norm, NORMS)
    return NORMS[norm](eps)
