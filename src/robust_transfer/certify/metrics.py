"""Summaries of certificates: certified accuracy at a radius, the average certified radius,
and the radii at which a table reports them for an input size."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Cohen et al.'s CIFAR-10 table radii (3x32x32 inputs).
CIFAR_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
CIFAR_DIM = 3 * 32 * 32


def radius_scale(input_shape: Sequence[int]) -> float:
    """(d / 3072) ** (1/4) for d input values: 1 at 3x32x32, so CIFAR users get Cohen et
    al.'s table radii; 2.65 at 3x224x224 (their ImageNet table spans radii 0.5-3.0, about 3x
    the CIFAR span, where a per-pixel-RMS sqrt(d) rule would give 7x); 0.38 at 1x8x8 digits,
    where the largest radius, 0.38, is about 40% of the median half-distance (0.93) from a
    digit to the nearest digit of another class. A certificate's radius is sigma * PhiInv(pA)
    whatever d, so the noise level, not the pixel count, sets its range: the fourth root
    follows the published tables rather than a per-pixel rule."""
    return (math.prod(input_shape) / CIFAR_DIM) ** 0.25


def table_radii(input_shape: Sequence[int]) -> list[float]:
    """`CIFAR_RADII` scaled to the input size (`radius_scale`), rounded to 3 decimals."""
    s = radius_scale(input_shape)
    return [round(r * s, 3) for r in CIFAR_RADII]


def certified_accuracy(radius: torch.Tensor, correct: torch.Tensor,
                       radii: Sequence[float]) -> list[float]:
    """Per r in `radii`: the fraction of images certified correct with radius >= r (the
    approximate certified accuracy of Cohen et al.; abstentions are never correct)."""
    radius, correct = torch.as_tensor(radius).double(), torch.as_tensor(correct).bool()
    if not len(radius):
        return [float("nan")] * len(radii)
    return [((radius >= r) & correct).double().mean().item() for r in radii]


def average_certified_radius(radius: torch.Tensor, correct: torch.Tensor) -> float:
    """ACR (Zhai et al. 2020, MACER): the mean over all images of the certified radius where
    the certified class is the label, 0 elsewhere."""
    radius, correct = torch.as_tensor(radius).double(), torch.as_tensor(correct).bool()
    return (radius * correct).mean().item() if len(radius) else float("nan")
