"""Small CNNs with the conventions every other layer relies on.

- Inputs are images in [0,1]; normalisation (mean/std) is the first module, so attacks and
  eps live in pixel space.
- `model.blocks` is an ordered, named `nn.Sequential` of conv blocks (the unit the transfer
  protocol freezes and unfreezes); `model.head` is the linear classifier.
- `features(x)` is the penultimate representation; `forward(x)` returns logits.

The seam other layers use instead of reaching inside (every architecture offers it):
- `block_names`: the blocks' names in forward order;
- `split(k)`: (frozen prefix, trainable suffix) for fine-tuning the head plus the last k
  blocks, as `nn.Module`s that share the model's parameters, with suffix(prefix(x)) == model(x);
- `forward_to(x, name)`: the output of one named block, for layer-wise analyses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Literal

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

    @property
    def block_names(self) -> list[str]:
        """Names of the blocks in forward order (`block1`..`blockB`)."""
        return [name for name, _ in self.blocks.named_children()]

    def split(self, k: int | Literal["all"] | None) -> tuple[nn.Sequential, nn.Sequential]:
        """(frozen prefix, trainable suffix) for training the head plus the last `k` blocks.

        The transfer protocol of Utrera et al. (arXiv 2007.05869) freezes all but the last k
        blocks, and influence functions (Koh & Liang 2017) differentiate the suffix on cached
        prefix outputs; both take the cut from here rather than rebuilding the model.

        - k = 0: prefix = normaliser, every block, pool, flatten (its output is `features`);
          suffix = the head.
        - 0 < k < B: prefix = normaliser + the first B - k blocks; suffix = the last k blocks,
          pool, flatten, head.
        - k = B, None or "all": prefix = the normaliser alone (buffers only, no parameters).

        The parts are `nn.Sequential`s of the model's own modules (named as in the model:
        `normalizer`, `block1`, ..., `pool`, `flatten`, `head`), not copies: parameters,
        buffers and train/eval flags are the model's, and suffix(prefix(x)) equals model(x)
        exactly (the same operations in the same order). Split again after `reset_head`.

        Shape: prefix (N, C, H, W) -> activations; suffix activations -> (N, num_classes).

        Example:
            prefix, suffix = model.split(1)
            prefix.requires_grad_(False)  # train the last block and the head
        """
        names = self.block_names
        if k is None or k == "all":
            k = len(names)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(names):
            raise UserError(
                f"unfrozen blocks must be 0..{len(names)} (0 = head only) or 'all', got {k!r}"
            )
        blocks = list(self.blocks.named_children())
        normalizer, head = ("normalizer", self.normalizer), ("head", self.head)
        pooling = [("pool", self.pool), ("flatten", nn.Flatten())]
        if k == 0:
            prefix, suffix = [normalizer, *blocks, *pooling], [head]
        else:
            cut = len(blocks) - k
            prefix, suffix = [normalizer, *blocks[:cut]], [*blocks[cut:], *pooling, head]
        return nn.Sequential(OrderedDict(prefix)), nn.Sequential(OrderedDict(suffix))

    def forward_to(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Output (N, C, H', W') of block `name` for images `x` in [0,1]: the normaliser and
        the blocks up to and including `name`. For layer-wise analyses such as Szegedy et
        al.'s units vs random directions (arXiv 1312.6199, sec. 3)."""
        names = self.block_names
        if name not in names:
            raise UserError(f"unknown block {name!r}; allowed: {', '.join(names)}")
        h = self.normalizer(x)
        for block_name, block in self.blocks.named_children():
            h = block(h)
            if block_name == name:
                break
        return h

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
