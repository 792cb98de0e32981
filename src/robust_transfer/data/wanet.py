"""WaNet: a warping-based, nearly invisible backdoor trigger (Nguyen & Tran 2021, "WaNet --
imperceptible warping-based backdoor attack", arXiv 2102.10369).

The trigger moves pixels instead of adding a pattern. A k x k control grid of random
displacements in [-1, 1] is drawn once from `seed`, normalised by its mean absolute value
(their code: `ins / mean|ins|`), upsampled bicubically to the image, scaled by s / H and added
to the identity sampling grid, which is clipped to [-1, 1] (the image's extent); the image is
resampled on that grid with bilinear `F.grid_sample(..., align_corners=True)`. A convex
combination of pixels, so the output stays in [0, 1], and s = 0 is the identity.

Noise mode (their `cross_ratio`, default 2): besides the rate-share of images warped and
relabelled, `cross_ratio` times as many other training images are warped by the same field
plus fresh uniform noise in [-1, 1] / H on the grid, and keep their true labels, so the model
learns the exact warp rather than "any warp -> target". `cover_examples` picks and makes
them; `data.poison` asks every trigger for such label-keeping cover examples.

Scale: their defaults are k = 4, s = 0.5 on 32 x 32 (CIFAR-10, GTSRB) and 28 x 28 (MNIST).
Both are relative to the image: k control points per side give the same field shape on any
size, and s / H in grid units [-1, 1] is a displacement of about s * |field| / 2 pixels at
every H. So on the 8 x 8 digits k = 4 (<= H) and s = 0.5 keep their meaning: the same
sub-pixel warp, which on 8 pixels is a larger share of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robust_transfer.errors import UserError
from robust_transfer.plugins import build_options, option


class WaNet:
    """WaNet warping trigger (Nguyen & Tran 2021): a fixed smooth random flow field from a
    `k` x `k` control grid (seeded), strength `s`, applied with bilinear resampling.
    `cross_ratio`: noise-mode examples per poisoned image (0 turns noise mode off).

    Shape: (N, C, H, W) in [0,1] -> (N, C, H, W) in [0,1].

    Example:
        trigger = WaNet((1, 8, 8), k=4, s=0.5, seed=0)
        x_triggered = trigger.apply(x)
    """

    name = "wanet"
    seeded = True  # the control grid

    @dataclass(frozen=True)
    class Options:
        k: int = option(4, "side of the control grid of random displacements, 2..H")
        s: float = option(0.5, "warping strength (0: the identity)")
        cross_ratio: float = option(2.0, "noise mode: noise-warped images with true labels "
                                    "per poisoned image (0: off)")

    def __init__(self, input_shape: tuple[int, int, int], options: Options | None = None,
                 seed: int = 0, **values) -> None:
        o = options or build_options(self.Options, values, "trigger 'wanet'")
        k, s, cross_ratio = o.k, o.s, o.cross_ratio
        _, h, w = input_shape
        if not 2 <= k <= min(h, w):
            raise UserError(f"wanet k (control grid side) must be an integer in 2..{min(h, w)} "
                            f"on {h}x{w} images, got {k!r}")
        if not s >= 0:
            raise UserError(f"wanet s (warping strength) must be >= 0, got {s}")
        if not cross_ratio >= 0:
            raise UserError(f"wanet cross_ratio must be >= 0, got {cross_ratio}")
        self.input_shape, self.k, self.s = tuple(input_shape), k, s
        self.cross_ratio = cross_ratio
        gen = torch.Generator().manual_seed(seed)
        control = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
        self.control = control / control.abs().mean()  # (1, 2, k, k), mean |.| = 1
        # (1, H, W, 2) flow in grid units; channel 0 moves along x (width), 1 along y.
        self.flow = F.interpolate(self.control, size=(h, w), mode="bicubic",
                                  align_corners=True).permute(0, 2, 3, 1)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                                    indexing="ij")
        self.identity = torch.stack((cols, rows), dim=2)[None]
        self.grid = (self.identity + self.s * self.flow / h).clamp(-1, 1)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise UserError(f"trigger 'wanet' was made for images {self.input_shape}, got a "
                            f"batch {tuple(x.shape)}")

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(x.device, x.dtype).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", align_corners=True).clamp(0.0, 1.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self._warp(x, self.grid)

    def cover_examples(self, x: torch.Tensor, poisoned: torch.Tensor,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise mode in a poisoned set (`data.poison` asks any trigger for these): (indices,
        images) of round(cross_ratio * len(poisoned)) images of `x` not in `poisoned`, drawn
        from `generator`, warped with noise (`noise_examples`); they keep their labels."""
        if not self.cross_ratio > 0:
            return torch.zeros(0, dtype=torch.long), x[:0]
        rest = torch.nonzero(~torch.isin(torch.arange(len(x)), poisoned)).flatten()
        n = round(self.cross_ratio * len(poisoned))
        cross = rest[torch.randperm(len(rest), generator=generator)[:n]]
        return cross, self.noise_examples(x[cross], generator)

    def noise_examples(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise mode: each image warped by the field plus its own uniform grid noise in
        [-1, 1] / H (drawn from `generator`), clipped to the image. Labels stay true."""
        self._check(x)
        _, h, w = self.input_shape
        noise = (torch.rand(len(x), h, w, 2, generator=generator) * 2 - 1) / h
        return self._warp(x, (self.grid + noise).clamp(-1, 1))
