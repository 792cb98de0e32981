"""Raw image sets: inputs in [0,1] shaped (N, C, H, W), integer labels.

`digits` is scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside the package, so
no download). `synthetic` is procedurally generated: each class is a fixed random pattern
plus noise, so tiny models learn it in a few steps — for fast tests. `cifar10` reads the
official binary release from local files (nothing is downloaded at run time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robust_transfer.errors import UserError

DATA_ENV = "ROBUST_TRANSFER_DATA"
CIFAR10_DIR = "cifar-10-batches-bin"


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


def data_root() -> Path:
    """Where local data sets live: $ROBUST_TRANSFER_DATA, else ~/.robust_transfer/data."""
    return Path(os.environ.get(DATA_ENV, "~/.robust_transfer/data")).expanduser()


def read_cifar_records(
    paths: list[Path], label_bytes: int = 1, label_index: int = 0, num_classes: int = 10,
    name: str = "CIFAR-10",
) -> ImageSet:
    """CIFAR binary records from files (`parse_cifar_records`)."""
    raw = np.concatenate([np.fromfile(p, dtype=np.uint8) for p in paths])
    return parse_cifar_records(raw, label_bytes, label_index, num_classes,
                               f"{name} file(s) {[str(p) for p in paths]}")


def parse_cifar_records(
    raw: np.ndarray, label_bytes: int = 1, label_index: int = 0, num_classes: int = 10,
    where: str = "CIFAR-10 data",
) -> ImageSet:
    """CIFAR binary records: `label_bytes` label bytes (CIFAR-10: 1; CIFAR-100: coarse, fine),
    then 3,072 pixel bytes (R, G, B planes, 32x32); the label is byte `label_index`."""
    size = label_bytes + 3072
    if raw.size == 0 or raw.size % size:
        raise UserError(f"corrupt {where}: size is not a multiple of {size:,}-byte records")
    records = raw.reshape(-1, size)
    labels = records[:, label_index]
    if labels.max() >= num_classes:
        raise UserError(f"corrupt {where}: label > {num_classes - 1}")
    pixels = records[:, label_bytes:].reshape(-1, 3, 32, 32)
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    return ImageSet(x, torch.from_numpy(labels.astype(np.int64)))


def cifar10(root: Path | None = None) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 (Krizhevsky 2009) from its binary release, as (train, test): 50,000 and
    10,000 images 3x32x32 in [0,1]. Extract cifar-10-binary.tar.gz into `root`
    (default `data_root()`), giving `root/cifar-10-batches-bin/`."""
    directory = (root or data_root()) / CIFAR10_DIR
    train = [directory / f"data_batch_{i}.bin" for i in range(1, 6)]
    test = [directory / "test_batch.bin"]
    missing = [p for p in train + test if not p.is_file()]
    if missing:
        raise UserError(
            f"CIFAR-10 not found: {str(missing[0])!r} is missing; extract "
            f"cifar-10-binary.tar.gz into {str(root or data_root())!r} (or set ${DATA_ENV})"
        )
    return read_cifar_records(train), read_cifar_records(test)


def adapt_images(images: ImageSet, channels: int, size: int | None = None,
                 what: str = "images") -> ImageSet:
    """`images` as a model with `channels` input channels and `size` x `size` inputs takes
    them: grey images repeated to 3 channels (the usual way to feed MNIST-like targets to an
    ImageNet source, as in Utrera et al., arXiv 2007.05869), then a bilinear resize
    (antialiased when shrinking) when `size` is given and differs. Values stay in [0,1].

    Colour to grey is not guessed: 3 channels into a 1-channel model is a `UserError`.
    Resizing materialises the new tensor: N x channels x size^2 floats.

    Shape: (N, C, H, W) -> (N, channels, size, size).

    Example:
        rgb = adapt_images(mnist_train, channels=3, size=32)
    """
    x = images.x
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise UserError(f"{what} have {x.shape[1]} channels but the model takes {channels}; "
                            "only grey (1-channel) images are adapted (repeated to 3)")
        x = x.expand(-1, channels, -1, -1)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        from torch.nn import functional as F

        shrink = size < max(x.shape[-2:])
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=shrink).clamp_(0.0, 1.0)
    if x is images.x:
        return images
    return ImageSet(x.contiguous(), images.y)
