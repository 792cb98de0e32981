"""Saliency: input gradients of the loss, plain and SmoothGrad.

Utrera et al. (arXiv 2007.05869, Fig. 4) — after Tsipras et al. (2019, arXiv 1805.12152) —
show that the loss gradient with respect to the input of an adversarially trained model looks
like the object, while a natural model's looks like noise. `input_gradient` is that map;
`smoothgrad` (Smilkov et al. 2017, arXiv 1706.03825) averages it over Gaussian-noised copies
of the input. `ink_mass_fraction` turns "looks like the object" into a number for digits: the
share of the saliency mass (|gradient| summed over channels) that lies on the image's own ink.

Every map has the input's shape (N, C, H, W), is computed in eval mode with
`torch.autograd.grad` (no parameter gradients left behind), and is deterministic given the
seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.data import ImageSet
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import eval_mode
from robust_transfer.stats import t_interval

METHODS = ("gradient", "smoothgrad")


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d loss(f(x_i), y_i) / d x_i for every image (cross-entropy, same shape as `x`)."""
    device = next(model.parameters()).device
    x = x.detach().to(device).requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        # Summed loss: each image's gradient is its own loss's (eval mode: no batch coupling).
        loss = F.cross_entropy(model(x), y.to(device), reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g.detach()


def smoothgrad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int = 25,
               sigma: float = 0.15, seed: int = 0, batch_size: int = 1024) -> torch.Tensor:
    """SmoothGrad: mean input gradient over `samples` copies x + N(0, sigma^2), sigma a
    fraction of the input range (1 for [0,1] images; Smilkov et al. suggest 10-20%).
    The noisy copies are not clipped, as in the paper. Vectorised over copies."""
    if samples < 1 or sigma < 0:
        raise UserError(f"SmoothGrad needs samples >= 1 and sigma >= 0, got {samples}, {sigma}")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, *x.shape), generator=gen, dtype=x.dtype) * sigma
    noisy = (x.detach().cpu().unsqueeze(0) + noise).flatten(0, 1)
    labels = y.repeat(samples)
    grads = torch.cat([
        input_gradient(model, noisy[i : i + batch_size], labels[i : i + batch_size]).cpu()
        for i in range(0, len(noisy), batch_size)
    ])
    return grads.view(samples, *x.shape).mean(0).to(x.device)


def saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "gradient",
             **options) -> torch.Tensor:
    """The `method` ('gradient' | 'smoothgrad') saliency map of each image, shaped like `x`."""
    check_choice("saliency method", method, METHODS)
    if method == "gradient":
        return input_gradient(model, x, y)
    return smoothgrad(model, x, y, **options)


def ink_mask(x: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """(N, H, W) pixels where the image has ink (mean over channels above `threshold`)."""
    return x.mean(1) > threshold


def ink_mass_fraction(saliency_map: torch.Tensor, x: torch.Tensor,
                      threshold: float = 0.3) -> torch.Tensor:
    """(N,) share of each map's mass |s| (summed over channels) on the image's own ink pixels.
    A map blind to the digit scores about the ink's share of the pixels (`ink_mask` mean)."""
    mass = saliency_map.abs().sum(1)
    on_ink = (mass * ink_mask(x, threshold)).flatten(1).sum(1)
    return on_ink / mass.flatten(1).sum(1).clamp_min(1e-30)


def pick_images(images: ImageSet, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of `per_class` images of each class, ordered class by class."""
    from robust_transfer.data import shots_per_class

    index = shots_per_class(images.y, per_class, seed)
    return index[torch.argsort(images.y[index], stable=True)]


@dataclass
class SaliencyComparison:
    """Maps of several models on the same images: maps[(model label, method)] ~ images."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[int, ...]
    maps: dict[tuple[str, str], torch.Tensor]
    ink_fraction: dict[tuple[str, str], torch.Tensor]
    chance: torch.Tensor  # (N,) share of ink pixels: the score of a digit-blind map
    threshold: float

    def table(self) -> list[dict]:
        """One row per (model, method): mean ink-mass fraction, 95% t-interval over images,
        the chance level and the lift over it."""
        rows = []
        chance = float(self.chance.mean())
        for (label, method), frac in self.ink_fraction.items():
            values = frac.double().cpu().numpy()
            _, half, n = t_interval(values)
            half = np.nan_to_num(half)  # one image: no spread
            rows.append({"model": label, "method": method, "images": n,
                         "ink mass fraction": float(values.mean()), "95% CI ±": float(half),
                         "chance (ink pixel share)": chance,
                         "lift": float(values.mean()) / chance})
        return rows


def compare_saliency(models: dict[str, nn.Module], images: ImageSet,
                     methods: tuple[str, ...] = METHODS, class_names: tuple[int, ...] = (),
                     threshold: float = 0.3, samples: int = 25, sigma: float = 0.15,
                     seed: int = 0) -> SaliencyComparison:
    """Saliency maps of every model (label -> model) by every method on the same images."""
    for method in methods:
        check_choice("saliency method", method, METHODS)
    maps, fractions = {}, {}
    for label, model in models.items():
        for method in methods:
            options = {"samples": samples, "sigma": sigma, "seed": seed}
            s = saliency(model, images.x, images.y, method,
                         **(options if method == "smoothgrad" else {})).cpu()
            maps[(label, method)] = s
            fractions[(label, method)] = ink_mass_fraction(s, images.x, threshold)
    chance = ink_mask(images.x, threshold).flatten(1).float().mean(1)
    return SaliencyComparison(images.x, images.y, tuple(class_names), maps, fractions, chance,
                              threshold)


def saliency_for_checkpoints(paths: list, task: str | None = None, split: str = "test",
                             per_class: int = 2, methods: tuple[str, ...] = METHODS,
                             threshold: float = 0.3, samples: int = 25, sigma: float = 0.15,
                             seed: int = 0, device: str | torch.device = "cpu"
                             ) -> SaliencyComparison:
    """`compare_saliency` for checkpoint directories of one task, on `per_class` images per
    class of its `split` (drawn with `seed`), models labelled natural / robust (...)."""
    from robust_transfer.explain.checkpoints import load_labelled, task_split

    models = load_labelled(paths, task, device)
    data = task_split(models[0].task, split)
    images = data.subset(pick_images(data, per_class, seed))
    return compare_saliency({m.label: m.model for m in models}, images, methods,
                            models[0].task.classes, threshold, samples, sigma, seed)
