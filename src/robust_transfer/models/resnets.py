"""ResNet-18/50 with torchvision's parameter names, and the CIFAR-style PreActResNet-18.

Published weights load without renaming: the modules sit exactly where torchvision
(`torchvision.models.resnet`, He et al. 2016, "Deep residual learning", arXiv 1512.03385)
and MadryLab `robustness` put them — `conv1`, `bn1`, `layer1`..`layer4` with
`.{i}.conv1/bn1/conv2/bn2[/conv3/bn3]/downsample.0/.1`, `fc` — and PreActResNet-18 where
Wong et al.'s fast_adversarial (`preact_resnet.py`, arXiv 2001.03994) puts them:
`conv1`, `layer1`..`layer4` with `.{i}.bn1/conv1/bn2/conv2[/shortcut.0]`, then `bn`,
`linear` (BackdoorBench's variant, `preact-resnet18-nobn`, has no `bn`). The only extra keys
are our normaliser's buffers (`normalizer.mean|std`).

Blocks (the unit the transfer protocol freezes, `split(k)`): the stem is block 0, then
every residual block in forward order — ResNet-18 and PreActResNet-18 have 1 + 8 blocks,
ResNet-50 1 + 16. "Unfrozen blocks" k counts from the end, so k = 1..16 on ResNet-50 are
the last k bottlenecks (Utrera et al.'s k in {1, 3, 6, 9}) and k = 17 ("all") also trains
the stem. Block names: `stem`, `layer1_0`, `layer1_1`, ... (`layer2_0` is torchvision's
`layer2.0`; `nn.Module` names cannot hold dots). `model.blocks` is a view over the
modules, not a registered container, so the state dict keeps the published names.

Input size: ResNet-18/50 keep the ImageNet stem (7x7 stride-2 conv and max-pool) at every
input size, so published ImageNet weights load; on 32x32 images layer4 works at 1x1.
PreActResNet-18 is the CIFAR-style network (3x3 stride-1 stem, no max-pool) for 32x32.
All pool globally, so any input size runs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from robust_transfer.models.base import BlockNet, ModelSpec, Normalize, check_normaliser


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's two 3x3 convs with an identity (or 1x1 `downsample`) shortcut."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's 1x1 -> 3x3 (strided: "ResNet v1.5") -> 1x1 bottleneck, width x4 out."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, arXiv 1603.05027): BN-ReLU before each
    conv; the shortcut (a 1x1 conv when the shape changes) taps the first BN-ReLU."""

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        if stride != 1 or c_in != planes:
            self.shortcut = nn.Sequential(_conv1x1(c_in, planes, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + shortcut


WIDTHS = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)
# arch -> (block class, residual blocks per stage)
RESNETS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
# arch -> (residual blocks per stage, final BN-ReLU after layer4)
PREACT_RESNETS: dict[str, tuple[tuple[int, ...], bool]] = {
    "preact-resnet18": ((2, 2, 2, 2), True),  # Wong et al.'s fast_adversarial
    "preact-resnet18-nobn": ((2, 2, 2, 2), False),  # BackdoorBench's models/preact_resnet.py
}


def _stages(owner: nn.Module, make, c_in: int, depths: tuple[int, ...], expansion: int) -> int:
    """Register layer1..layer4 on `owner` (torchvision's names); return the output width."""
    stages = zip(WIDTHS, STRIDES, depths, strict=True)
    for stage, (planes, stride, depth) in enumerate(stages, start=1):
        layers = []
        for i in range(depth):
            layers.append(make(c_in, planes, stride if i == 0 else 1))
            c_in = planes * expansion
        setattr(owner, f"layer{stage}", nn.Sequential(*layers))
    return c_in


class _ResidualNet(BlockNet):
    """The shared view: the stem, then each residual block of layer1..layer4, as blocks."""

    def _stem(self) -> nn.Module:
        raise NotImplementedError

    @property
    def blocks(self) -> nn.Sequential:
        """A view (built on each access, not registered) over the stem and residual blocks."""
        named = [("stem", self._stem())]
        for stage in range(1, len(WIDTHS) + 1):
            layer = getattr(self, f"layer{stage}")
            named += [(f"layer{stage}_{i}", block) for i, block in enumerate(layer)]
        return nn.Sequential(OrderedDict(named))

    def _init_weights(self) -> None:
        # torchvision's initialisation: Kaiming-normal convs (fan_out), BN weight 1, bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class ResNet(_ResidualNet):
    """ResNet-18 / ResNet-50 (He et al. 2016, arXiv 1512.03385) in torchvision's layout,
    with the normaliser inside: logits of images in [0,1].

    A torchvision or MadryLab `robustness` state dict loads as it is (`models.foreign`
    imports the files). Blocks: `stem` (conv1, bn1, relu, maxpool), then one per residual
    block; the head is `fc` (also reachable as `model.head`).

    Shape:
        - Input: (N, C, H, W) in [0,1], any H, W >= 32 (ImageNet: 224).
        - Output: (N, num_classes) logits.

    Example:
        model = build_model(ModelSpec("resnet50", 1000, 3, IMAGENET_MEAN, IMAGENET_STD))
        logits = model(torch.rand(2, 3, 224, 224))
    """

    head_attr = "fc"

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        check_normaliser(spec)
        block, depths = RESNETS[spec.arch]
        self.spec = spec
        self.normalizer = Normalize(spec.mean, spec.std)
        self.conv1 = nn.Conv2d(spec.in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        width = _stages(self, block, 64, depths, block.expansion)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, spec.num_classes)
        self._init_weights()

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def _stem(self) -> nn.Module:
        return nn.Sequential(OrderedDict(
            conv1=self.conv1, bn1=self.bn1, relu=self.relu, maxpool=self.maxpool))

    def post_modules(self) -> list[tuple[str, nn.Module]]:
        return [("avgpool", self.avgpool), ("flatten", nn.Flatten())]


class PreActResNet(_ResidualNet):
    """PreActResNet-18 (He et al. 2016, arXiv 1603.05027), CIFAR-style, in the layout of
    Wong et al.'s fast_adversarial (arXiv 2001.03994), used by robustness and backdoor
    benchmarks: `conv1` (3x3, stride 1), `layer1`..`layer4` of `PreActBlock`s
    (`.{i}.bn1/conv1/bn2/conv2[/shortcut.0]`), a final `bn` + ReLU, global average pool,
    `linear`. Blocks: `stem` (conv1), then one per residual block; the final BN-ReLU runs
    after the blocks with the pooling (trainable whenever k >= 1). `preact-resnet18-nobn` is
    BackdoorBench's variant (SCLBD/BackdoorBench `models/preact_resnet.py`): the same keys
    without `bn.*`, pooling straight after layer4.

    Shape:
        - Input: (N, C, H, W) in [0,1] (designed for 32x32; global pooling, so 4x4 average
          pooling of the original equals ours at 32x32).
        - Output: (N, num_classes) logits.

    Example:
        model = build_model(ModelSpec("preact-resnet18", 10, 3, (0.5,) * 3, (0.5,) * 3))
        logits = model(torch.rand(2, 3, 32, 32))
    """

    head_attr = "linear"

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        check_normaliser(spec)
        self.spec = spec
        self.normalizer = Normalize(spec.mean, spec.std)
        self.conv1 = _conv3x3(spec.in_channels, 64)
        depths, final_bn = PREACT_RESNETS[spec.arch]
        width = _stages(self, PreActBlock, 64, depths, 1)
        if final_bn:
            self.bn = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(width, spec.num_classes)
        self._init_weights()

    @property
    def head(self) -> nn.Linear:
        return self.linear

    def _stem(self) -> nn.Module:
        return self.conv1

    def post_modules(self) -> list[tuple[str, nn.Module]]:
        final = [("bn", self.bn), ("relu", self.relu)] if hasattr(self, "bn") else []
        return [*final, ("avgpool", self.avgpool), ("flatten", nn.Flatten())]
