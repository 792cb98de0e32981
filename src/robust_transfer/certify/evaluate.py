"""Certify a test set at one or more noise levels: per-image certificates and a summary per
(sigma, radius), with the attack's upper bound beside the certified lower bound.

The one code path behind `robust-transfer certify` and the certification columns of a grid
run. Images are certified in chunks (for progress); since an image's noise depends only on
(seed, its content), chunking does not change any number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from robust_transfer.certify.empirical import empirical_robust_accuracy
from robust_transfer.certify.metrics import (
    average_certified_radius,
    certified_accuracy,
    table_radii,
)
from robust_transfer.certify.smooth import ABSTAIN, Smooth, check_budget
from robust_transfer.data.augment import check_sigma
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import predict_logits

IMAGE_CHUNK = 50


@dataclass(frozen=True)
class EmpiricalAttack:
    """The PGD-L2 + EOT attack on the smoothed soft classifier (`empirical_robust_accuracy`):
    `steps` PGD steps, `m` noise draws per forward pass, `eot_samples` passes per gradient,
    `n` draws for g's majority vote on the attacked images."""

    steps: int = 10
    m: int = 4
    eot_samples: int = 2
    n: int = 500

    def __post_init__(self) -> None:
        for name in ("steps", "m", "eot_samples", "n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"attack {name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class CertifyResult:
    """`images`: one row per (sigma, image): image, label, prediction (-1 = abstain), radius,
    correct, p_lower, noise_accuracy (share of the base model's noisy draws that are right).
    `summary`: one row per (sigma, radius): certified_accuracy, empirical_accuracy (NaN
    without the attack), and per sigma acr, abstain_rate, noise_accuracy, clean_accuracy (the
    base model without noise)."""

    images: pd.DataFrame
    summary: pd.DataFrame


def spread(total: int, max_images: int) -> slice:
    """Every (total // max_images)-th of `total` test images, at most `max_images` of them:
    all classes even when a test set is sorted by class (Cohen et al. certify every 20th
    CIFAR-10 test image)."""
    step = max(1, total // max(max_images, 1))
    return slice(0, step * max_images, step)


def check_radii(radii: Sequence[float]) -> list[float]:
    out = sorted(dict.fromkeys(float(r) for r in radii))
    if not out or any(not r >= 0 or r == float("inf") for r in out):
        raise UserError(f"radii must be finite numbers >= 0, got {list(radii)}")
    return out


def check_sigmas(sigmas: Sequence[float]) -> list[float]:
    """The distinct noise levels, in the order given (a repeated `--sigma` would certify, and
    write every row, twice)."""
    out = list(dict.fromkeys(check_sigma(s) for s in sigmas))
    if not out:
        raise UserError("give at least one sigma, e.g. --sigma 0.25")
    return out


def certify_dataset(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigmas: Sequence[float],
    num_classes: int, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
    radii: Sequence[float] | None = None, batch_size: int = 1000, seed: int = 0,
    attack: EmpiricalAttack | None = EmpiricalAttack(),
    progress: Callable[[int], None] | None = None,
) -> CertifyResult:
    """Cohen et al.'s CERTIFY of every image of (x, y) at each sigma, summarised at `radii`
    (default: `table_radii` of the input size), with `attack`'s empirical robust accuracy of
    the smoothed classifier at the same radii (None: skipped). `progress(k)` after every k
    images certified or attacked."""
    sigmas = check_sigmas(sigmas)
    check_budget(n0, n, alpha)
    radii = check_radii(table_radii(x.shape[1:]) if radii is None else radii)
    y = y.long().cpu()
    clean = (predict_logits(model, x).argmax(1).cpu() == y).double().mean().item()
    images, summary = [], []
    for sigma in sigmas:
        smooth = Smooth(model, num_classes, sigma)
        parts = []
        for i in range(0, len(x), IMAGE_CHUNK):
            parts.append(smooth.certify(x[i:i + IMAGE_CHUNK], n0, n, alpha, batch_size, seed))
            if progress is not None:
                progress(len(parts[-1].radius))
        prediction = torch.cat([p.prediction for p in parts])
        radius = torch.cat([p.radius for p in parts])
        counts = torch.cat([p.counts for p in parts])
        correct = prediction == y
        noise_acc = counts.gather(1, y.unsqueeze(1)).squeeze(1).double() / n
        images.append(pd.DataFrame({
            "sigma": sigma, "image": range(len(y)), "label": y.numpy(),
            "prediction": prediction.numpy(), "radius": radius.numpy(),
            "correct": correct.numpy(), "p_lower": torch.cat([p.p_lower for p in parts]).numpy(),
            "noise_accuracy": noise_acc.numpy()}))
        empirical = [float("nan")] * len(radii)
        if attack is not None:
            empirical = empirical_robust_accuracy(smooth, x, y, radii, attack.n, attack.m,
                                                  attack.eot_samples, attack.steps, seed,
                                                  batch_size)
            if progress is not None:
                progress(len(y))
        per_sigma = {"acr": average_certified_radius(radius, correct),
                     "abstain_rate": (prediction == ABSTAIN).double().mean().item(),
                     "noise_accuracy": noise_acc.mean().item(), "clean_accuracy": clean}
        for r, cert, emp in zip(radii, certified_accuracy(radius, correct, radii), empirical,
                                strict=True):
            summary.append({"sigma": sigma, "radius": r, "certified_accuracy": cert,
                            "empirical_accuracy": emp, **per_sigma})
    return CertifyResult(pd.concat(images, ignore_index=True), pd.DataFrame(summary))
