"""Threat models as small strategy objects: the only place a norm lives.

After MadryLab's `attack_steps.py`: adding a norm is adding one class. A threat model owns
everything an attack needs to know about its geometry:

- `random_start(x, rng, *counter)`: a uniform point of the eps-ball around x (PGD);
- `surface_start(x, rng, *counter)`: a random point of the ball's surface (APGD);
- `step(x_adv, grad, alpha)`: the steepest-ascent step of size alpha in this norm;
- `project(x_adv, x)`: back into the eps-ball around x and into [0,1];
- `project_delta(v)`: a perturbation itself onto the eps-ball (no image, no box; the
  universal perturbation);
- `to_surface(delta)`: delta rescaled to norm exactly eps (Square-L2, APGD's start).

Every method that returns an input keeps it inside [0,1]. Random numbers come from an
`ExampleRNG` (per-example streams keyed by content, seed and the caller's counter), so an
example's start does not depend on the other examples in its batch.
"""

from __future__ import annotations

import math

import torch

from robust_transfer.attacks.rng import ExampleRNG
from robust_transfer.errors import UserError, check_choice


def _per_example_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """Norm of each example, shaped (N, 1, 1, 1) for broadcasting."""
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.ndim - 1)))


def _streams(x: torch.Tensor, rng: ExampleRNG | None) -> ExampleRNG:
    """The caller's per-example streams, or fresh ones (a random seed) when None."""
    if isinstance(rng, torch.Generator):
        raise TypeError("threat models draw from per-example streams, not a torch.Generator: "
                        "pass ExampleRNG.for_inputs(x, seed) (robust_transfer.attacks.rng)")
    return ExampleRNG.for_inputs(x, None) if rng is None else rng


def _radius_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1,) * (x.ndim - 1)


class ThreatModel:
    """The set of allowed inputs: the eps-ball of one norm around x, intersected with [0,1]."""

    norm: str = ""
    p: float = float("nan")

    def __init__(self, eps: float) -> None:
        try:
            value = float(eps)
        except (TypeError, ValueError):
            raise UserError(f"eps must be >= 0 and finite, got {eps!r}") from None
        if not (math.isfinite(value) and value >= 0):  # rejects NaN, inf and negatives
            raise UserError(f"eps must be >= 0 and finite, got {eps}")
        self.eps = value

    def random_start(
        self, x: torch.Tensor, rng: ExampleRNG | None = None, *counter: int
    ) -> torch.Tensor:
        """A uniform random point of the eps-ball around each x, clipped to [0,1]."""
        raise NotImplementedError

    def _direction(self, x: torch.Tensor, rng: ExampleRNG, counter: tuple[int, ...]):
        """APGD's random direction t, before it is put on the sphere (`surface_start`)."""
        raise NotImplementedError

    def surface_start(
        self, x: torch.Tensor, rng: ExampleRNG | None = None, *counter: int
    ) -> torch.Tensor:
        """A random point of the ball's surface, x + eps * t / ||t||, then into [0,1]
        (APGD's start, Croce & Hein 2020: Linf t ~ U[-1,1]^d, L2 t ~ N(0, I))."""
        t = self._direction(x, _streams(x, rng), counter)
        return self.project((x + self.to_surface(t)).clamp(0, 1), x)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha) -> torch.Tensor:
        """One ascent step of size `alpha` (a float or an (N, 1, ...) tensor) along `grad`,
        steepest for this norm."""
        raise NotImplementedError

    def project_delta(self, v: torch.Tensor) -> torch.Tensor:
        """Euclidean projection of each perturbation v (N, ...) onto the eps-ball; no box."""
        raise NotImplementedError

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The nearest point of the eps-ball around x, then clipped to [0,1]. For Linf and L2
        clipping moves each coordinate toward x, so the result stays in the ball."""
        return (x + self.project_delta(x_adv - x)).clamp(0, 1)

    def to_surface(self, delta: torch.Tensor) -> torch.Tensor:
        """delta rescaled to norm exactly eps (zero stays zero)."""
        return self.eps * delta / _per_example_norm(delta, self.p).clamp_min(1e-12)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example perturbation size in this norm, shape (N,)."""
        return _per_example_norm(x_adv - x, self.p).flatten()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"


class LinfThreat(ThreatModel):
    norm, p = "linf", float("inf")

    def random_start(self, x, rng=None, *counter):
        u = _streams(x, rng).uniform(x.shape[1:], *counter, dtype=x.dtype)
        return (x + (2 * u - 1) * self.eps).clamp(0, 1)

    def _direction(self, x, rng, counter):
        return 2 * rng.uniform(x.shape[1:], *counter, dtype=x.dtype) - 1

    def step(self, x_adv, grad, alpha):
        return x_adv + alpha * grad.sign()

    def project_delta(self, v):
        return v.clamp(-self.eps, self.eps)


class L2Threat(ThreatModel):
    norm, p = "l2", 2.0

    def random_start(self, x, rng=None, *counter):
        # Uniform in the ball: Gaussian direction, radius eps * U^(1/d).
        rng = _streams(x, rng)
        direction = rng.normal(x.shape[1:], *counter, dtype=x.dtype)
        direction = direction / _per_example_norm(direction, 2).clamp_min(1e-12)
        u = rng.uniform(_radius_shape(x), *counter, 3, dtype=x.dtype)
        return (x + direction * self.eps * u ** (1.0 / x[0].numel())).clamp(0, 1)

    def _direction(self, x, rng, counter):
        # A Gaussian direction is uniform on the sphere; a normalised cube sample is not.
        return rng.normal(x.shape[1:], *counter, dtype=x.dtype)

    def step(self, x_adv, grad, alpha):
        # + 1e-12 (not a clamp) as autopgd_base.py and MadryLab: a zero gradient stays zero.
        return x_adv + alpha * grad / (_per_example_norm(grad, 2) + 1e-12)

    def project_delta(self, v):
        return v * (self.eps / _per_example_norm(v, 2).clamp_min(1e-12)).clamp(max=1.0)


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
    """L1 ball: sparse steps on the top-k coordinates by |grad| and the exact projection onto
    the L1 ball intersected with the [0,1] box (APGD-L1, Croce & Hein 2021, arXiv 2103.01208;
    sparse L1 descent, Tramer & Boneh 2019, arXiv 1904.13000). `step` uses a fixed fraction
    `sparsity` of the coordinates (PGD); `sparse_step` takes a per-example count k, which
    APGD-L1 adapts during its run."""

    norm, p = "l1", 1.0

    def __init__(self, eps: float, sparsity: float = 0.05) -> None:
        super().__init__(eps)
        if not 0 < sparsity <= 1:
            raise UserError(f"L1 step sparsity must be in (0, 1], got {sparsity}")
        self.sparsity = float(sparsity)

    def random_start(self, x, rng=None, *counter):
        # Uniform in the L1 ball: Laplace direction on the L1 sphere, radius eps * U^(1/d);
        # clamping to the box only shrinks |delta_i|, so it stays in the ball.
        rng = _streams(x, rng)
        exp = -torch.log1p(-rng.uniform(x.shape[1:], *counter, 1, dtype=x.dtype))
        sign = rng.sign(x.shape[1:], *counter, 2, dtype=x.dtype)
        direction = sign * exp / _per_example_norm(exp, 1).clamp_min(1e-12)
        u = rng.uniform(_radius_shape(x), *counter, 3, dtype=x.dtype)
        return (x + direction * self.eps * u ** (1.0 / x[0].numel())).clamp(0, 1)

    def surface_start(self, x, rng=None, *counter):
        """APGD-L1's start (autopgd_base.py): a Gaussian t ~ N(0, I) projected onto the L1
        ball and the box. ||t||_1 ~ 0.8 d is far above eps for images, so the point is on
        the surface of ball-and-box, already sparse (the projection soft-thresholds)."""
        t = _streams(x, rng).normal(x.shape[1:], *counter, dtype=x.dtype)
        return (x + project_l1_box(t, -x, 1 - x, self.eps)).clamp(0, 1)

    def step(self, x_adv, grad, alpha):
        k = max(1, int(round(self.sparsity * grad[0].numel())))
        return self.sparse_step(x_adv, grad, alpha, k)

    def sparse_step(self, x_adv, grad, alpha, k: int | torch.Tensor):
        """x_adv + alpha * e, e = sign(grad) on the k largest |grad_i| (k an int or an (N,)
        tensor, per example), divided by their number so that ||e||_1 = 1.

        Coordinates the box already stops from moving along the gradient sign get no share
        of the step (the steepest ascent direction on L1 ball and box, "Mind the box": a
        share there would be clipped away by the projection, wasting the L1 budget).
        """
        blocked = ((x_adv <= 0) & (grad < 0)) | ((x_adv >= 1) & (grad > 0))
        g = torch.where(blocked, torch.zeros_like(grad), grad).flatten(1)
        a = g.abs()
        d = a.shape[1]
        if isinstance(k, torch.Tensor):
            k = k.to(device=a.device, dtype=torch.long).clamp(1, d).view(-1, 1)
            top = a.topk(int(k.max()), dim=1).values  # sorted, largest first
            threshold = top.gather(1, k - 1)
        else:
            threshold = a.topk(min(max(k, 1), d), dim=1).values[:, -1:]
        e = torch.where((a >= threshold) & (a > 0), g.sign(), torch.zeros_like(g))
        e = e / e.abs().sum(1, keepdim=True).clamp_min(1)
        return x_adv + alpha * e.view_as(x_adv)

    def project_delta(self, v):
        # A box [-|v|, |v|] never binds: the plain L1-ball projection (soft-thresholding).
        return project_l1_box(v, -v.abs(), v.abs(), self.eps)

    def project(self, x_adv, x):
        delta = project_l1_box(x_adv - x, -x, 1 - x, self.eps)
        return (x + delta).clamp(0, 1)

    def __repr__(self) -> str:
        return f"L1Threat(eps={self.eps}, sparsity={self.sparsity})"


NORMS: dict[str, type[ThreatModel]] = {"linf": LinfThreat, "l2": L2Threat, "l1": L1Threat}
# A default radius per norm in pixel space, for evaluations given none (`attack`, `defend`).
DEFAULT_EPS = {"linf": 0.1, "l2": 0.5, "l1": 2.0}


def make_threat(norm: str, eps: float) -> ThreatModel:
    """The threat model for `norm` ("linf", "l2", ...) with radius `eps`."""
    check_choice("norm", norm, NORMS)
    return NORMS[norm](eps)
