"""Does a certificate transfer? Randomized-smoothing certification of grid models.

A grid spec's `certify:` section (`CertifySpec`) makes every fine-tune certify its final model
on `max_images` of the target task's test images, every k-th (Cohen et al.'s CERTIFY at one
noise level, `certify.certify_dataset`, no attack), and adds to the run's final-epoch row:
`certify_sigma`, `certified_accuracy_r<radius>` per radius, `acr`, `abstain_rate` and
`noise_accuracy` (the fine-tuned base model's accuracy under the noise).
`transfer.certify_study.certify_sources` certifies the grid's source models on their own task
the same way, for the "before transfer" side. Noise is seeded by the run's seed; the attack's
upper bound is left to the `certify` command (it costs more than the certificate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from robust_transfer.certify import certify_dataset, check_budget, table_radii
from robust_transfer.certify.evaluate import check_radii, spread
from robust_transfer.data import adapt_images, load_task
from robust_transfer.data.augment import check_sigma
from robust_transfer.errors import UserError

PREFIX = "certified_accuracy_r"


@dataclass(frozen=True)
class CertifySpec:
    """A grid's `certify:` section: noise level `sigma`, CERTIFY's n0, n, alpha, the number of
    test images, and the radii of the columns (None: `certify.table_radii` of the input)."""

    sigma: float = 0.25
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    max_images: int = 200
    radii: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", check_sigma(self.sigma, "certify.sigma"))
        check_budget(self.n0, self.n, self.alpha)
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) \
                or self.max_images < 1:
            raise UserError(f"certify.max_images must be an integer >= 1, got "
                            f"{self.max_images!r}")
        if self.radii is not None:
            object.__setattr__(self, "radii", tuple(check_radii(self.radii)))

    @classmethod
    def from_dict(cls, d) -> CertifySpec:
        if not isinstance(d, dict):
            raise UserError(f"spec key 'certify' must be a mapping such as {{sigma: 0.25, n: "
                            f"1000}}, got {d!r}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise UserError(f"unknown key {unknown[0]!r} in spec.certify; allowed: "
                            f"{', '.join(sorted(allowed))}")
        d = dict(d)
        if d.get("radii") is not None:
            radii = d["radii"] if isinstance(d["radii"], list) else [d["radii"]]
            if any(isinstance(r, bool) or not isinstance(r, int | float) for r in radii):
                raise UserError(f"certify.radii must be numbers, got {d['radii']!r}")
            d["radii"] = tuple(float(r) for r in radii)
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["radii"] is None:
            del d["radii"]
        else:
            d["radii"] = list(d["radii"])
        return d


def certify_columns(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: CertifySpec,
                    seed: int = 0) -> dict:
    """The module docstring's columns for `model` on `spec.max_images` of (x, y), evenly
    spread (`certify.evaluate.spread`)."""
    pick = spread(len(y), spec.max_images)
    x, y = x[pick], y[pick]
    radii = spec.radii or table_radii(x.shape[1:])
    result = certify_dataset(model, x, y, [spec.sigma], model.spec.num_classes, spec.n0,
                             spec.n, spec.alpha, radii, seed=seed, attack=None)
    s = result.summary
    row = {"certify_sigma": spec.sigma}
    row |= {f"{PREFIX}{r:g}": a for r, a in zip(s.radius, s.certified_accuracy, strict=True)}
    return row | {k: float(s[k].iloc[0]) for k in ("acr", "abstain_rate", "noise_accuracy")}


def task_test_images(model: nn.Module, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`task`'s test images as `model` takes them (channels, size), on its device."""
    spec = model.spec
    test = adapt_images(load_task(task).test, spec.in_channels, spec.input_size,
                        f"task {task!r} images")
    device = next(model.parameters()).device
    return test.x.to(device), test.y.to(device)
