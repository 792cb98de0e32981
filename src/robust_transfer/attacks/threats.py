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


NORMS: dict[str, type[ThreatModel]] = {"linf": LinfThreat, "l2": L2Threat}


def make_threat(norm: str, eps: float) -> ThreatModel:
    """The threat model for `norm` ("linf", "l2", ...) with radius `eps`."""
    check_choice("norm", norm, NORMS)
    return NORMS[norm](eps)
