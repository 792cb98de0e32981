"""Small CNNs, and the architecture registry (`ARCHS`, `build_model`, `num_blocks`).

Conventions every architecture follows (the seam lives in `models.base.BlockNet`):

- Inputs are images in [0,1]; normalisation (mean/std) is the first module, so attacks and
  eps live in pixel space.
- `model.blocks` is an ordered, named `nn.Sequential` of conv blocks (the unit the transfer
  protocol freezes and unfreezes); `model.head` is the linear classifier.
- `features(x)` is the penultimate representation; `forward(x)` returns logits.

The seam other layers use instead of reaching inside (every architecture offers it, and
`spec`, `reset_head(num_classes, generator)`):
- `block_names`: the blocks' names in forward order;
- `split(k)`: (frozen prefix, trainable suffix) for fine-tuning the head plus the last k
  blocks, as `nn.Module`s that share the model's parameters, with suffix(prefix(x)) == model(x);
- `forward_to(x, name)`: the output of one named block, for layer-wise analyses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from robust_transfer.errors import check_choice
from robust_transfer.models.base import BlockNet, ModelSpec, Normalize, check_normaliser
from robust_transfer.models.resnets import PREACT_RESNETS, RESNETS, PreActResNet, ResNet

__all__ = ["ARCHS", "Arch", "BlockNet", "ConvNet", "ModelSpec", "Normalize", "build_model",
           "num_blocks"]

# ConvNet arch name -> (channel widths per block, stride per block)
CONV_ARCHS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # 8x8 inputs (digits): three conv blocks, 8x8 -> 8 -> 4 -> 2, then global average pool.
    "cnn-small": ((32, 64, 128), (1, 2, 2)),
    # 8x8 inputs, wider and deeper (4 blocks, 1.5x the widths; 8 -> 8 -> 4 -> 2 -> 2): the
    # other side of an architecture comparison on the embedded data (specs/archs.yaml).
    "cnn-small-wide": ((48, 96, 192, 192), (1, 2, 2, 1)),
    # 32x32 inputs (CIFAR-size): four wider blocks, 32 -> 16 -> 8 -> 4 -> 2.
    "cnn-medium": ((64, 128, 256, 256), (2, 2, 2, 2)),
}


# (input size, summary) per CONV_ARCHS entry, in its order.
CONV_NOTES = ((8, "3 conv blocks, for 8x8"), (8, "4 wider conv blocks, for 8x8"),
              (32, "4 strided blocks, 32x32"))


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvNet(BlockNet):
    """normalizer -> blocks (block1..blockB) -> global average pool -> head."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        check_choice("arch", spec.arch, CONV_ARCHS)
        check_normaliser(spec)
        self.spec = spec
        widths, strides = CONV_ARCHS[spec.arch]
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

    def post_modules(self) -> list[tuple[str, nn.Module]]:
        return [("pool", self.pool), ("flatten", nn.Flatten())]


@dataclass(frozen=True)
class Arch:
    """One registered architecture: how to build it, how many freezable blocks it has, and
    the input size it is designed for (a note for users; every net pools globally)."""

    name: str
    build: type[BlockNet]  # the class; called with a ModelSpec
    num_blocks: int
    input_size: int
    summary: str


def _registry() -> dict[str, Arch]:
    archs = {
        name: Arch(name, ConvNet, len(widths), size, summary)
        for (name, (widths, _)), (size, summary) in zip(CONV_ARCHS.items(), CONV_NOTES,
                                                         strict=True)
    }
    for name, (_, depths) in RESNETS.items():
        archs[name] = Arch(name, ResNet, 1 + sum(depths), 224,
                           f"torchvision {name} layout, ImageNet stem (stem + {sum(depths)} "
                           "residual blocks)")
    for name, (depths, final_bn) in PREACT_RESNETS.items():
        layout = "fast_adversarial layout" if final_bn else "BackdoorBench layout, no final BN"
        archs[name] = Arch(name, PreActResNet, 1 + sum(depths), 32,
                           f"CIFAR-style pre-activation ResNet-18, {layout} (stem + "
                           f"{sum(depths)} blocks)")
    return archs


# arch name -> Arch: the one registry (CLI --arch, specs, checkpoints, imports).
ARCHS: dict[str, Arch] = _registry()


def num_blocks(arch: str) -> int:
    """How many freezable blocks `arch` has (the range of "unfrozen blocks" is 0..this)."""
    check_choice("arch", arch, ARCHS)
    return ARCHS[arch].num_blocks


def build_model(spec: ModelSpec, seed: int | None = None) -> BlockNet:
    """A freshly initialised model of `spec.arch`; `seed` makes the initialisation
    reproducible."""
    check_choice("arch", spec.arch, ARCHS)
    build = ARCHS[spec.arch].build
    if seed is None:
        return build(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(spec)
