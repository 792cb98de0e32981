"""What every architecture shares: the spec it is rebuilt from, the normaliser inside the
model, and the block seam the transfer protocol and the analyses use.

`BlockNet` holds the seam once, for every architecture (small CNNs, ResNets):
- `normalizer` first, so attacks and eps live in pixel space;
- `blocks`: an ordered, named `nn.Sequential` of the units the protocol freezes;
- `post`: what runs between the last block and the head (pooling, a final BN-ReLU);
- `head`: the linear classifier; `features(x)` is its input.

Subclasses set `normalizer`, provide `blocks` (a registered module or a view over modules
registered under other names, so published parameter names stay as they are), `post_modules`
and `head_attr` (the attribute the head is stored under: `head`, torchvision's `fc`, ...).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from robust_transfer.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights.

    `input_size` is the side of the square images the model was trained on (None: not
    recorded). Fine-tuning resizes target images to it when they differ
    (`data.adapt_images`); the architectures themselves pool globally and accept any size.
    """

    arch: str = "cnn-small"
    num_classes: int = 5
    in_channels: int = 1
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.5,))
    input_size: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        """The spec a checkpoint's `model` record describes; `ValueError` naming the field
        when a count is not a positive integer or the normaliser does not fit the channels."""
        size = d.get("input_size")
        spec = cls(
            arch=d["arch"],
            num_classes=_positive_int(d["num_classes"], "num_classes"),
            in_channels=_positive_int(d["in_channels"], "in_channels"),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            input_size=None if size is None else _positive_int(size, "input_size"),
        )
        if not len(spec.mean) == len(spec.std) == spec.in_channels:
            raise ValueError(f"model.mean and model.std need one value per channel "
                             f"({spec.in_channels}), got {len(spec.mean)} and {len(spec.std)}")
        if not all(s > 0 for s in spec.std):
            raise ValueError(f"model.std must be > 0, got {list(spec.std)}")
        return spec


def _positive_int(value, name: str) -> int:
    """`value` as an int >= 1 (an integral float such as 5.0 is accepted), else `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"model.{name} must be an integer >= 1, got {value!r}")
    return int(value)


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers, so they travel with the checkpoint."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def check_normaliser(spec: ModelSpec) -> None:
    if len(spec.mean) != spec.in_channels or len(spec.std) != spec.in_channels:
        raise UserError(f"mean/std need {spec.in_channels} values, got {spec.mean}/{spec.std}")


def linear_head(in_features: int, num_classes: int,
                generator: torch.Generator | None = None) -> nn.Linear:
    """A classifier initialised like `nn.Linear`'s default (uniform +-1/sqrt(fan_in)) but
    drawn from `generator`, so the same seed gives the same head."""
    head = nn.Linear(in_features, num_classes)
    bound = 1.0 / in_features**0.5
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
    return head


class BlockNet(nn.Module):
    """normalizer -> blocks -> post (pooling, flatten) -> head; the seam every layer uses."""

    # Set by subclasses, as registered modules or as properties (views): the seam's parts.
    spec: ModelSpec
    normalizer: Normalize
    blocks: nn.Sequential
    head: nn.Linear
    head_attr: str = "head"  # where `reset_head` stores the new classifier

    def post_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, module) pairs between the last block and the head, ending in a flatten."""
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation (N, feature_dim) of images in [0,1]."""
        h = self.blocks(self.normalizer(x))
        for _, module in self.post_modules():
            h = module(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def block_names(self) -> list[str]:
        """Names of the blocks in forward order."""
        return [name for name, _ in self.blocks.named_children()]

    def split(self, k: int | Literal["all"] | None) -> tuple[nn.Sequential, nn.Sequential]:
        """(frozen prefix, trainable suffix) for training the head plus the last `k` blocks.

        The transfer protocol of Utrera et al. (arXiv 2007.05869) freezes all but the last k
        blocks, and influence functions (Koh & Liang 2017) differentiate the suffix on cached
        prefix outputs; both take the cut from here rather than rebuilding the model.

        - k = 0: prefix = normaliser, every block, the post-block modules (pooling, flatten;
          its output is `features`); suffix = the head.
        - 0 < k < B: prefix = normaliser + the first B - k blocks; suffix = the last k blocks,
          the post-block modules, the head.
        - k = B, None or "all": prefix = the normaliser alone (buffers only, no parameters).

        The parts are `nn.Sequential`s of the model's own modules (named `normalizer`, the
        block names, the post-block names, `head`), not copies: parameters, buffers and
        train/eval flags are the model's, and suffix(prefix(x)) equals model(x) exactly (the
        same operations in the same order). Split again after `reset_head`.

        Shape: prefix (N, C, H, W) -> activations; suffix activations -> (N, num_classes).

        Example:
            prefix, suffix = model.split(1)
            prefix.requires_grad_(False)  # train the last block and the head
        """
        blocks = list(self.blocks.named_children())
        if k is None or k == "all":
            k = len(blocks)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(blocks):
            raise UserError(
                f"unfrozen blocks must be 0..{len(blocks)} (0 = head only) or 'all', got {k!r}"
            )
        normalizer, head = ("normalizer", self.normalizer), ("head", self.head)
        post = self.post_modules()
        if k == 0:
            prefix, suffix = [normalizer, *blocks, *post], [head]
        else:
            cut = len(blocks) - k
            prefix, suffix = [normalizer, *blocks[:cut]], [*blocks[cut:], *post, head]
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
        """Replace the classifier with a freshly initialised one for `num_classes` classes
        (`linear_head`: nn.Linear's default initialisation drawn from `generator`)."""
        head = linear_head(self.feature_dim, num_classes, generator)
        setattr(self, self.head_attr, head.to(next(self.parameters()).device))
        self.spec = ModelSpec(**{**self.spec.to_dict(), "num_classes": num_classes})
