"""Unit analysis: are single units more meaningful than random directions of a layer?

Szegedy et al. ("Intriguing properties of neural networks", 2014, arXiv 1312.6199, sec. 3)
rank held-out images by the activation of one unit, phi(x) . e_i, and by a random direction
of the same layer, phi(x) . v, and find both top lists equally semantically coherent: the
meaning lives in the space, not in the basis. Here phi(x) is a layer's output averaged over
space (one value per channel) for a conv block `block1..blockB`, or the penultimate
`features`. Coherence is a number: the fraction of the top-k images that share their most
common class, averaged over all (live) units vs over as many random unit directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robust_transfer.data import ImageSet
from robust_transfer.errors import UserError
from robust_transfer.models.nets import ConvNet
from robust_transfer.models.runtime import eval_mode


def layer_names(model: ConvNet) -> list[str]:
    """The layers `layer_activations` reads: each block, then the penultimate `features`."""
    return [*model.block_names, "features"]


@torch.no_grad()
def layer_activations(model: ConvNet, x: torch.Tensor, layer: str,
                      batch_size: int = 1024) -> torch.Tensor:
    """(N, C) output of `layer` for images `x`, spatially averaged for conv blocks."""
    names = layer_names(model)
    if layer not in names:
        raise UserError(f"unknown layer {layer!r}; allowed: {', '.join(names)}")
    device = next(model.parameters()).device

    def phi(xb: torch.Tensor) -> torch.Tensor:
        if layer == "features":
            return model.features(xb)
        return F.adaptive_avg_pool2d(model.forward_to(xb, layer), 1).flatten(1)

    with eval_mode(model):
        out = [phi(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return torch.cat(out).cpu()


def random_directions(dim: int, count: int, seed: int = 0) -> torch.Tensor:
    """(count, dim) directions uniform on the unit sphere (normalised Gaussians)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(count, dim, generator=gen, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def top_images(activations: torch.Tensor, directions: torch.Tensor, k: int) -> torch.Tensor:
    """(D, k) indices of the images with the largest projection phi(x) . v on each direction
    (rows of `directions`; a unit is a one-hot row). Ties break by lower index."""
    scores = activations.double() @ directions.double().T  # (N, D)
    order = torch.sort(scores.T, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def majority_fraction(labels: torch.Tensor) -> torch.Tensor:
    """(D,) fraction of each row of labels (D, k) equal to the row's most common label."""
    counts = torch.nn.functional.one_hot(labels).sum(1)
    return counts.max(1).values.double() / labels.shape[1]


@dataclass
class UnitAnalysis:
    """Top-k images of every live unit and of as many random directions."""

    layer: str
    k: int
    units: torch.Tensor  # (U,) live unit indices
    unit_top: torch.Tensor  # (U, k) image indices
    directions: torch.Tensor  # (U, C)
    direction_top: torch.Tensor  # (U, k)
    unit_purity: torch.Tensor  # (U,)
    direction_purity: torch.Tensor  # (U,)
    dead_units: int

    def summary(self) -> dict:
        return {"layer": self.layer, "top-k": self.k, "units": len(self.units),
                "dead units (excluded)": self.dead_units,
                "unit purity": float(self.unit_purity.mean()),
                "random-direction purity": float(self.direction_purity.mean())}


def unit_analysis(model: ConvNet, images: ImageSet, layer: str, k: int = 9,
                  seed: int = 0) -> UnitAnalysis:
    """Szegedy et al. sec. 3 on `images`: top-k images per unit of `layer` and per random
    direction (one per live unit, drawn with `seed`). Units whose activation is constant
    over the images (dead ReLUs) rank nothing and are left out."""
    if not 1 <= k <= len(images):
        raise UserError(f"top-k must be 1..{len(images)} (the number of images), got {k}")
    acts = layer_activations(model, images.x, layer)
    live = torch.nonzero(acts.std(0) > 0).flatten()
    if len(live) == 0:
        raise UserError(f"every unit of layer {layer!r} is constant on these images")
    eye = torch.eye(acts.shape[1], dtype=torch.float64)[live]
    unit_top = top_images(acts, eye, k)
    directions = random_directions(acts.shape[1], len(live), seed)
    direction_top = top_images(acts, directions, k)
    return UnitAnalysis(
        layer, k, live, unit_top, directions, direction_top,
        majority_fraction(images.y[unit_top]), majority_fraction(images.y[direction_top]),
        dead_units=acts.shape[1] - len(live),
    )
