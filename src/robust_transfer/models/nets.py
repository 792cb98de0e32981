"""Small CNNs with the conventions every other layer relies on.

- Inputs are images in [0,1]; normalisation (mean/std) is the first module, so attacks and
  eps live in pixel space.
- `model.blocks` is an ordered, named `nn.Sequential` of conv blocks (the unit the transfer
  protocol freezes and unfreezes); `model.head` is the linear classifier.
- `features(x)` is the penultimate representation; `forward(x)` returns logits.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from robust_transfer.errors import UserError, check_choice

# arch name -> (channel widths per block, stride per block)
ARCHS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # 8x8 inputs (digits): three conv blocks, 8x8 -> 8 -> 4 -> 2, then global average pool.
    "cnn-small": ((32, 64, 128), (1, 2, 2)),
    # 32x32 inputs (CIFAR-size): four wider blocks, 32 -> 16 -> 8 -> 4 -> 2.
    "cnn-medium": ((64, 128, 256, 256), (2, 2, 2, 2)),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights."""

    arch: str = "cnn-small"
    num_classes: int = 5
    in_channels: int = 1
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.5,))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(
            arch=d["arch"],
            num_classes=int(d["num_classes"]),
            in_channels=int(d["in_channels"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers, so they travel with the checkpoint."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """normalizer -> blocks (block1..blockB) -> global average pool -> head."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        check_choice("arch", spec.arch, ARCHS)
        if len(spec.mean) != spec.in_channels or len(spec.std) != spec.in_channels:
            raise UserError(f"mean/std need {spec.in_channels} values, got {spec.mean}/{spec.std}")
        self.spec = spec
        widths, strides = ARCHS[spec.arch]
        channels = (spec.in_channels, *widths)
        self.normalizer = Normalize(spec.mean, spec.std)
        self.blocks = nn.Sequential(
            OrderedDict(
                (f"block{i + 1}", _conv_block(channels[i], channels[i + 1], strides[i]))
                for i in range(len(widths))
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], spec.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation (N, feature_dim) of images in [0,1]."""
        return self.pool(self.blocks(self.normalizer(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def reset_head(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """Replace the classifier with a freshly initialised one for `num_classes` classes.

        Initialisation matches `nn.Linear`'s default (uniform +-1/sqrt(fan_in)) but draws
        from `generator`, so the same seed gives the same head.
        """
        head = nn.Linear(self.feature_dim, num_classes)
        bound = 1.0 / self.feature_dim**0.5
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
        self.head = head.to(next(self.parameters()).device)
        self.spec = ModelSpec(**{**self.spec.to_dict(), "num_classes": num_classes})


def build_model(spec: ModelSpec, seed: int | None = None) -> ConvNet:
    """A freshly initialised model; `seed` makes the initialisation reproducible."""
    if seed is None:
        return ConvNet(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConvNet(spec)
