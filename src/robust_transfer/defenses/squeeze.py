"""Feature squeezing (Xu, Evans & Qi 2018, arXiv 1704.01155): input denoising that merges
many inputs into one, so a small perturbation is likely to be squeezed away.

- `BitDepth(bits)`: colour-depth reduction, round(x * (2^b - 1)) / (2^b - 1) (Xu et al.
  use 1 bit on MNIST, 5 on CIFAR-10). Its gradient is zero almost everywhere, so it is
  declared non-differentiable: BPDA backpropagates through the identity.
- `MedianSmoothing(size)`: a size x size median filter per channel (2x2 and 3x3 in the
  paper), with scipy's `median_filter(mode="reflect")` conventions, which the reference code
  used: symmetric edge padding, the window placed at offsets -(size // 2) ..
  size - 1 - size // 2, and the (size^2 // 2)-th smallest value (the upper median for an even
  window). It is piecewise linear (the output is one of the inputs), so its true gradient
  is exact almost everywhere and needs no BPDA.

Both are vectorised (one `round`; one unfold + kthvalue) and keep shape and [0,1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robust_transfer.attacks.adaptive import InputTransform
from robust_transfer.errors import UserError
from robust_transfer.plugins import option


class BitDepth(InputTransform):
    """Reduce every pixel to `bits` bits (Xu et al. 2018, arXiv 1704.01155).

    Shape: (N, C, H, W) in [0,1] -> (N, C, H, W), values in {0, 1/(2^b-1), ..., 1}.

    Example:
        squeeze = BitDepth(4)
        defended = Defended(model, squeeze)
    """

    name = "squeeze-bits"
    differentiable = False

    @dataclass(frozen=True)
    class Options:
        bits: int = option(4, "bits, 1..16 (default 4)")

    def __init__(self, bits: int) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise UserError(f"bit depth must be an integer in 1..16, got {bits!r}")
        self.bits = bits

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        return torch.round(x * levels) / levels

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _symmetric_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-n axis padded symmetrically (d c b a | a b c d | d c b a)."""
    i = torch.arange(-before, n + after, device=device)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= n, 2 * n - i - 1, i).clamp(0, n - 1)


class MedianSmoothing(InputTransform):
    """Median filter over `size` x `size` windows, per channel (Xu et al. 2018).

    Shape: (N, C, H, W) in [0,1] -> (N, C, H, W).

    Example:
        smooth = MedianSmoothing(2)
        x_smooth = smooth(x)
    """

    name = "median"

    @dataclass(frozen=True)
    class Options:
        size: int = option(2, "window side, 2..9 (default 2)")

    def __init__(self, size: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= 9:
            raise UserError(f"median window must be an integer in 2..9, got {size!r}")
        self.size = size

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        k = self.size
        before, after = k // 2, k - 1 - k // 2
        if before >= min(x.shape[-2:]):
            raise UserError(f"median window {k} is too large for {tuple(x.shape[-2:])} images")
        rows = _symmetric_index(x.shape[-2], before, after, x.device)
        cols = _symmetric_index(x.shape[-1], before, after, x.device)
        padded = x.index_select(-2, rows).index_select(-1, cols)
        windows = padded.unfold(-2, k, 1).unfold(-2, k, 1).flatten(-2)  # (N, C, H, W, k*k)
        return windows.kthvalue(k * k // 2 + 1, dim=-1).values

    def extra_repr(self) -> str:
        return f"size={self.size}"
