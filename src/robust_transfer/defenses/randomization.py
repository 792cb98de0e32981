"""Randomisation at inference time: random resize and pad (Xie et al. 2018, arXiv 1711.01991).

Each image is resized (nearest neighbour) to a random side r with H <= r < S, then placed at a
random offset inside an S x S zero canvas; the classifier sees the S x S result (networks with
global pooling accept it; ours do). Xie et al. used H = 299 and S = 331 (r in [299, 331)):
S = 1.107 H. At 8 x 8 that ratio gives S = 9, one size and two offsets, which is hardly
random, so the default is S = max(round(H * 331 / 299), H + 2): 10 at 8 x 8 (r in {8, 9},
13 placements), 35 at 32 x 32, 331 at 299. Its gradient exists (a resize by selection and a
pad are linear), but one draw's gradient describes that draw only: evaluate with EOT.

Draws are per example, from the module's own generator (`seed`), so two modules with the same
seed give the same sequence of outputs; `reseed(seed)` starts the sequence again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robust_transfer.attacks.adaptive import InputTransform
from robust_transfer.errors import UserError
from robust_transfer.plugins import option

XIE_RATIO = 331 / 299


def default_size(side: int) -> int:
    """The canvas side S for images of side `side` (see the module docstring)."""
    return max(round(side * XIE_RATIO), side + 2)


class RandomResizePad(InputTransform):
    """Random resize to r x r' and random zero padding to `size` x `size` (Xie et al. 2018).

    `size=None`: `default_size` of the input's height. Rectangular images keep their aspect
    ratio (r' = round(r * W / H), at most S - 1).

    Shape: (N, C, H, W) in [0,1] -> (N, C, S, S) in [0,1].

    Example:
        defended = Defended(model, RandomResizePad(seed=0))
        x_adv = PGD(defended, eps=0.1).set_adaptive(eot_samples=30)(x, y)
    """

    name = "random-resize"
    randomized = True

    @dataclass(frozen=True)
    class Options:
        size: int | None = option(None, "canvas side > image side (default max(round(1.107 "
                                  "H), H + 2))")

    def __init__(self, size: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                                 or size < 2):
            raise UserError(f"random-resize canvas size must be an integer >= 2, got {size!r}")
        self.size = size
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start the sequence of draws again from `seed`."""
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _uniform_int(self, low: torch.Tensor, high: torch.Tensor, g) -> torch.Tensor:
        """Per example an integer uniform in [low, high) (tensors of shape (N,))."""
        u = torch.rand(low.shape, generator=g, device=low.device)
        return low + (u * (high - low)).long().clamp(max=(high - low - 1).clamp(min=0))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s = default_size(h) if self.size is None else self.size
        if s <= max(h, w):
            raise UserError(f"random-resize canvas {s} must be larger than the images "
                            f"({h}x{w})")
        g = self._generator(x.device)
        zeros = torch.zeros(n, dtype=torch.long, device=x.device)
        rh = self._uniform_int(zeros + h, zeros + s, g)
        rw = (rh * w + h // 2).div(h, rounding_mode="floor").clamp(max=s - 1)
        top = self._uniform_int(zeros, s - rh + 1, g)
        left = self._uniform_int(zeros, s - rw + 1, g)
        grid = torch.arange(s, device=x.device)
        # nearest neighbour (TF's NEAREST_NEIGHBOR, half-pixel off): source = floor(i * in / r)
        i = grid.view(1, -1) - top.view(-1, 1)  # (N, S) position inside the resized image
        j = grid.view(1, -1) - left.view(-1, 1)
        rows = (i * h).div(rh.view(-1, 1), rounding_mode="floor")
        cols = (j * w).div(rw.view(-1, 1), rounding_mode="floor")
        inside = ((i >= 0) & (i < rh.view(-1, 1))).unsqueeze(2) & \
            ((j >= 0) & (j < rw.view(-1, 1))).unsqueeze(1)  # (N, S, S)
        index = rows.clamp(0, h - 1).unsqueeze(2) * w + cols.clamp(0, w - 1).unsqueeze(1)
        out = x.flatten(2).gather(2, index.view(n, 1, -1).expand(n, c, -1)).view(n, c, s, s)
        return out * inside.unsqueeze(1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, seed={self.seed}"
