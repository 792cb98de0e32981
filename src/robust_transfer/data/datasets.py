"""Raw image sets: inputs in [0,1] shaped (N, C, H, W), integer labels.

`digits` is scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside the package, so
no download). `synthetic` is procedurally generated: each class is a fixed random pattern
plus noise, so tiny models learn it in a few steps — for fast tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageSet:
    """Images in [0,1], shape (N, C, H, W), with labels (N,) as int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or len(self.x) != len(self.y):
            raise ValueError(f"bad ImageSet shapes {tuple(self.x.shape)} / {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor | np.ndarray) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.x[index], self.y[index])


def digits() -> ImageSet:
    """scikit-learn's digits: 1,797 images, 1x8x8, 16 grey levels scaled to [0,1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return ImageSet(x, torch.tensor(bunch.target, dtype=torch.long))


def synthetic(
    num_classes: int = 10, per_class: int = 60, size: int = 8, channels: int = 1, seed: int = 0
) -> ImageSet:
    """Class-dependent smooth patterns plus pixel noise, in [0,1]; same seed, same data."""
    gen = np.random.default_rng(seed)
    coarse = gen.random((num_classes, channels, 4, 4))
    patterns = np.kron(coarse, np.ones((1, 1, size // 4 + 1, size // 4 + 1)))[..., :size, :size]
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = gen.normal(0.0, 0.15, (len(labels), channels, size, size))
    x = np.clip(patterns[labels] + noise, 0.0, 1.0)
    return ImageSet(torch.tensor(x, dtype=torch.float32), torch.tensor(labels, dtype=torch.long))
