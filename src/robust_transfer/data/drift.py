"""Data drift for time-varying models: what each periodic model update is trained on.

After Li et al. 2022, "On the Permanence of Backdoors in Evolving Models" (arXiv 2206.04677;
v1: "Can Backdoor Attacks Survive Time-Varying Models?"): a deployed model is fine-tuned again
and again on fresh data whose distribution drifts away from the data it was first trained on;
the larger the shift, the faster a one-shot backdoor is forgotten. Two kinds of drift here,
both of a size `magnitude` in [0, 1] that grows with the update (`drift_magnitude`: strength
times update index over the number of updates, so the last update sees `strength`):

- `class-prior` (label shift): class priors p = (1 - m) u + m q, moving from uniform u toward
  a seeded random q ~ Dirichlet(1) (the same seed, the same q for every update of a run);
  `class_prior_sample` then draws examples with those priors (with replacement).
- `rotation` (covariate shift): every image rotated by m * `ROTATION_DEGREES` (45 degrees at
  magnitude 1) about its centre, bilinear, zero padding — a convex combination of pixels and
  zeros, so it stays in [0,1]. The BadNets patch itself is not rotated: it is stamped on
  test images as before, so what moves is the clean content the model must keep up with.

All vectorised over the batch; every draw takes a seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robust_transfer.errors import UserError, check_choice

DRIFTS = ("class-prior", "rotation")
ROTATION_DEGREES = 45.0


def check_strength(strength: float) -> float:
    """`strength` as a float, or `UserError` unless it is in [0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
            or not 0.0 <= strength <= 1.0:
        raise UserError(f"drift strength must be in [0, 1], got {strength!r}")
    return float(strength)


def drift_magnitude(strength: float, step: int, updates: int) -> float:
    """The drift of update `step` (0 = before any update) of `updates`: strength * step /
    updates, in [0, strength]."""
    if updates < 1 or not 0 <= step <= updates:
        raise UserError(f"update {step} is not in 0..{updates}")
    return check_strength(strength) * step / updates


def class_priors(num_classes: int, magnitude: float, seed: int) -> torch.Tensor:
    """Class priors (num_classes,) at drift `magnitude`: (1 - m) uniform + m q, q ~ Dirichlet(1)
    drawn with `seed`. Magnitude 0 is exactly uniform.

    Example:
        p = class_priors(10, 0.5, seed=0)   # sums to 1, halfway from uniform to q
    """
    m = check_strength(magnitude)
    gen = torch.Generator().manual_seed(seed)
    q = -torch.log(torch.rand(num_classes, generator=gen))  # Exp(1) draws ...
    q = q / q.sum()  # ... normalised: a Dirichlet(1) sample
    return (1 - m) * torch.full((num_classes,), 1.0 / num_classes) + m * q


def class_prior_sample(y: torch.Tensor, priors: torch.Tensor, n: int,
                       seed: int) -> torch.Tensor:
    """Indices (n,) into labels `y`: each draw's class from `priors`, then a uniform example of
    that class (with replacement). Classes absent from `y` are never drawn.

    Shape: y (N,) int64 with values in 0..len(priors)-1 -> (n,) int64.

    Example:
        index = class_prior_sample(task.train.y, class_priors(10, 1.0, 0), 500, seed=3)
    """
    if n < 1:
        raise UserError(f"images per update must be >= 1, got {n}")
    counts = torch.bincount(y, minlength=len(priors))
    weights = priors * (counts > 0)
    if not weights.sum() > 0:
        raise UserError("no example has a class with a positive prior")
    gen = torch.Generator().manual_seed(seed)
    classes = torch.multinomial(weights, n, replacement=True, generator=gen)
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    offset = (torch.rand(n, generator=gen) * counts[classes]).long()
    offset = torch.minimum(offset, counts[classes] - 1)  # rand can round up to 1.0 in float
    return order[starts[classes] + offset]


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Every image of `x` rotated by `degrees` (counter-clockwise) about its centre.

    Shape: (N, C, H, W) in [0,1] -> (N, C, H, W) in [0,1]."""
    if degrees == 0:
        return x.clone()
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                         dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp(0.0, 1.0)


def shift_inputs(x: torch.Tensor, drift: str, magnitude: float) -> torch.Tensor:
    """Images `x` under `drift` of `magnitude`: rotated for `rotation`, unchanged for
    `class-prior` (a label shift leaves each image as it is).

    Shape: (N, C, H, W) in [0,1] -> (N, C, H, W) in [0,1]."""
    check_choice("drift", drift, DRIFTS)
    m = check_strength(magnitude)
    return rotate(x, m * ROTATION_DEGREES) if drift == "rotation" else x
