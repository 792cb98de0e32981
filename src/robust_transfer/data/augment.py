"""Standard training augmentation: random crop with zero padding, and a horizontal flip where a
mirrored image is still the same class; and Gaussian noise (`GaussianNoise`, for randomized
smoothing: Cohen et al. 2019).

The CIFAR recipe of He et al. 2016 ("Deep Residual Learning for Image Recognition": 4-pixel
padding, random 32x32 crop, random horizontal flip), as used by Madry et al. 2018 and by the
fine-tuning runs of Utrera et al. (arXiv 2007.05869). The padding scales with the image:
`round(size / 8)` pixels, at least 1 (4 px at 32x32, 1 px at 8x8). Flips only for data sets
of natural images (`MIRROR_DATASETS`); never for digits, letters or characters, where a
mirrored 2 or a mirrored kana is not the same class (nor for `synthetic`, whose classes are
fixed asymmetric patterns). Fashion-MNIST flips (a mirrored shoe is a shoe); MNIST, KMNIST
and SVHN do not.

One draw per batch, vectorised on the batch's device (gather by index, no loop over images);
the offsets and flips come from a seeded CPU generator, so the same seed gives the same
images on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robust_transfer.errors import UserError

# Data sets whose mirror image is the same class (the others: digits and characters).
# ImageFolder directories are assumed to hold natural photographs.
MIRROR_DATASETS = frozenset({"cifar10", "cifar100", "cifar100-coarse", "fashion-mnist",
                             "imagefolder"})


def crop_padding(size: int) -> int:
    """Pixels of padding for a random crop of `size`x`size` images: size/8, at least 1."""
    return max(1, round(size / 8))


class RandomCropFlip:
    """Random crop after zero padding, plus an optional random horizontal flip, per image.

    He et al. 2016 (CIFAR augmentation). `pad` None: `crop_padding(height)`.

    Shape:
        x: (N, C, H, W) in [0,1] -> (N, C, H, W) in [0,1], on x's device.

    Example:
        >>> aug = RandomCropFlip(flip=True, seed=0)
        >>> x_aug = aug(x)
    """

    def __init__(self, flip: bool, seed: int = 0, pad: int | None = None) -> None:
        self.flip = bool(flip)
        self.pad = pad
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        pad = crop_padding(h) if self.pad is None else self.pad
        shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=self.generator)
        flips = torch.rand(n, generator=self.generator) < 0.5
        dy, dx = (s.to(x.device) for s in shifts)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
        cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W)
        if self.flip:
            cols = torch.where(flips.to(x.device)[:, None], cols.flip(1), cols)
        padded = F.pad(x, (pad, pad, pad, pad))
        batch = torch.arange(n, device=x.device)[:, None, None]
        out = padded[batch, :, rows, cols[:, None, :]]  # (N, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()


def mirror_safe(dataset: str) -> bool:
    """Whether a horizontal flip keeps the class, for images of `dataset`."""
    return dataset in MIRROR_DATASETS


# Added to the seed, so that a noise stream and the loop's shuffling stream (seeded with the
# same training seed) are different streams.
NOISE_SALT = 0x6E6F697365  # "noise"


def check_sigma(sigma: float, what: str = "sigma", allow_zero: bool = False) -> float:
    """`sigma` as a float; a `UserError` unless it is finite and > 0 (>= 0 with allow_zero)."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {sigma!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"{what} must be {bound} and finite, got {sigma}")
    return value


class GaussianNoise:
    """Gaussian data augmentation: x + N(0, sigma^2 I), drawn independently per coordinate.

    Cohen, Rosenfeld & Kolter 2019 ("Certified Adversarial Robustness via Randomized
    Smoothing", arXiv 1902.02918; locuslab/smoothing `train.py`): the noise is added to the
    [0,1] image, before the model's normaliser, and is *not* clipped to [0,1], because the
    smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c) that certification
    evaluates sees unclipped noise; training on clipped noise would train f on another
    distribution than the one g queries.

    Draws come from a generator seeded by `seed` on the input's device (one per device), so
    the same seed gives the same noise sequence on a device type (CPU and CUDA streams
    differ).

    Shape:
        x: (N, C, H, W) -> (N, C, H, W), same dtype and device; values may leave [0,1].

    Example:
        >>> noise = GaussianNoise(sigma=0.25, seed=0)
        >>> x_noisy = noise(x)
    """

    def __init__(self, sigma: float, seed: int = 0) -> None:
        self.sigma = check_sigma(sigma)
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """sigma * N(0, I) of `shape`, on `like`'s device and dtype (the next draw)."""
        key = str(like.device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=like.device).manual_seed(
                (self.seed + NOISE_SALT) % 2**63)
        z = torch.randn(shape, generator=self._generators[key], device=like.device,
                        dtype=like.dtype)
        return self.sigma * z

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sample(x.shape, x)
