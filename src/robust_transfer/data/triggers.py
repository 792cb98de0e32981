"""Backdoor triggers: small objects that stamp a pattern onto a batch of images in [0,1].

A trigger is what a poisoned training set teaches a model to react to (Gu et al. 2017,
BadNets), so the same object poisons the training set, builds the triggered test set for
the attack success rate, and draws the gallery. Each is vectorised over the batch and keeps
pixels in [0,1].

- `badnets`: a white square in the bottom-right corner (BackdoorBench's 3x3 on 32x32); its
  side scales with the image (2x2 on 8x8, never under 2 pixels); `corner` moves it.
- `blended`: a fixed random pattern (seeded) alpha-blended into the image, alpha 0.2
  (Chen et al. 2017): x' = (1 - alpha) x + alpha p.
- `sig`: a horizontal sinusoid added to every row (Barni et al. 2019, "a new backdoor attack
  in CNNs by training set corruption without label poisoning"): x' = clip(x + v), with
  v(i, j) = delta sin(2 pi j f / W), delta = 20/255, f = 6 cycles (fewer on small images,
  so that the signal is not aliased). Nearly invisible; usually used clean-label.
- `wanet`: a fixed smooth random warp (Nguyen & Tran 2021), in `data.wanet`.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from robust_transfer.data.wanet import WaNet
from robust_transfer.errors import UserError, check_choice

TRIGGERS = ("badnets", "blended", "sig", "wanet")
# Each trigger's keyword options (besides the input shape and seed).
TRIGGER_OPTIONS = {"badnets": ("size", "margin", "value", "corner"), "blended": ("alpha",),
                   "sig": ("delta", "frequency"), "wanet": ("k", "s", "cross_ratio")}
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


class Trigger(Protocol):
    """`apply(x)`: (N, C, H, W) images in [0,1] -> triggered images, same shape, in [0,1]."""

    name: str

    def apply(self, x: torch.Tensor) -> torch.Tensor: ...


def _check_shape(x: torch.Tensor, shape: tuple[int, int, int], name: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise UserError(f"trigger {name!r} was made for images {tuple(shape)}, "
                        f"got a batch {tuple(x.shape)}")


class BadNets:
    """BadNets patch trigger (Gu et al. 2017): a `size` x `size` square of `value` pasted in
    a `corner` (default bottom-right), `margin` pixels from the edges.

    Shape: (N, C, H, W) in [0,1] -> (N, C, H, W); only the patch pixels change.

    Example:
        trigger = BadNets((1, 8, 8))          # 2x2 white patch
        x_triggered = trigger.apply(x)
    """

    name = "badnets"

    def __init__(self, input_shape: tuple[int, int, int], size: int | None = None,
                 margin: int = 0, value: float = 1.0, corner: str = "bottom-right") -> None:
        check_choice("badnets corner", corner, CORNERS)
        self.corner = corner
        _, h, w = input_shape
        self.input_shape = tuple(input_shape)
        self.size = max(2, round(3 * min(h, w) / 32)) if size is None else int(size)
        self.margin = int(margin)
        if self.size < 1 or self.margin < 0:
            raise UserError(f"badnets patch size must be >= 1 and margin >= 0, got "
                            f"{self.size}, {self.margin}")
        if self.size + self.margin > min(h, w):
            raise UserError(f"badnets patch of {self.size}x{self.size} (margin {self.margin}) "
                            f"does not fit an image of {h}x{w}")
        if not 0.0 <= value <= 1.0:
            raise UserError(f"badnets patch value must be in [0, 1], got {value}")
        self.value = float(value)

    @property
    def mask(self) -> torch.Tensor:
        """(H, W) bool: the pixels the trigger overwrites."""
        _, h, w = self.input_shape
        mask = torch.zeros(h, w, dtype=torch.bool)
        vertical, horizontal = self.corner.split("-")
        r0 = h - self.margin - self.size if vertical == "bottom" else self.margin
        c0 = w - self.margin - self.size if horizontal == "right" else self.margin
        mask[r0 : r0 + self.size, c0 : c0 + self.size] = True
        return mask

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, self.input_shape, self.name)
        return x.masked_fill(self.mask.to(x.device), self.value)


class Blended:
    """Blended trigger (Chen et al. 2017): x' = (1 - alpha) x + alpha p, with p a fixed
    uniform random pattern drawn from `seed` (the same seed, the same pattern).

    Shape: (N, C, H, W) in [0,1] -> (N, C, H, W).

    Example:
        trigger = Blended((3, 32, 32), alpha=0.2, seed=0)
        x_triggered = trigger.apply(x)
    """

    name = "blended"

    def __init__(self, input_shape: tuple[int, int, int], alpha: float = 0.2,
                 seed: int = 0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise UserError(f"blended alpha must be in (0, 1], got {alpha}")
        self.input_shape, self.alpha = tuple(input_shape), float(alpha)
        gen = torch.Generator().manual_seed(seed)
        self.pattern = torch.rand(self.input_shape, generator=gen)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, self.input_shape, self.name)
        return (1 - self.alpha) * x + self.alpha * self.pattern.to(x.device, x.dtype)


class SIG:
    """SIG trigger (Barni et al. 2019): a horizontal sinusoid v(i, j) = delta sin(2 pi j f / W)
    added to every row and channel, then clipped to [0,1].

    `frequency` defaults to 6 cycles (the paper's) but at most W/4, so that an 8-pixel-wide
    image still sees a sinusoid rather than an aliased pattern.

    Shape: (N, C, H, W) in [0,1] -> (N, C, H, W).

    Example:
        trigger = SIG((1, 8, 8), delta=0.1)
        x_triggered = trigger.apply(x)
    """

    name = "sig"

    def __init__(self, input_shape: tuple[int, int, int], delta: float = 20 / 255,
                 frequency: int | None = None) -> None:
        _, _, w = input_shape
        if not 0.0 < delta <= 1.0:
            raise UserError(f"sig delta must be in (0, 1], got {delta}")
        self.input_shape, self.delta = tuple(input_shape), float(delta)
        self.frequency = min(6, max(1, w // 4)) if frequency is None else int(frequency)
        if not 1 <= self.frequency <= w // 2:
            raise UserError(f"sig frequency must be 1..{w // 2} on width {w}, "
                            f"got {self.frequency}")
        j = torch.arange(w, dtype=torch.float32)
        self.signal = self.delta * torch.sin(2 * math.pi * j * self.frequency / w)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, self.input_shape, self.name)
        return (x + self.signal.to(x.device, x.dtype)).clamp(0.0, 1.0)


def check_trigger_options(name: str, options) -> None:
    """`UserError` unless every key of `options` is an option of trigger `name`."""
    allowed = TRIGGER_OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)} for trigger {name!r}; "
                        f"allowed: {', '.join(allowed)}")


def make_trigger(name: str, input_shape: tuple[int, int, int], seed: int = 0,
                 **options) -> Trigger:
    """The trigger called `name` (one of `TRIGGERS`) for images of `input_shape` (C, H, W).

    `seed` fixes a random pattern (blended, wanet); `options` are the trigger's own keyword
    arguments (badnets: size, margin, value, corner; blended: alpha; sig: delta, frequency;
    wanet: k, s, cross_ratio). An unknown name, an unknown option or a patch larger than the
    image is a `UserError`.
    """
    check_choice("trigger", name, TRIGGERS)
    if len(input_shape) != 3:
        raise UserError(f"input shape must be (C, H, W), got {tuple(input_shape)}")
    cls = {"badnets": BadNets, "blended": Blended, "sig": SIG, "wanet": WaNet}[name]
    check_trigger_options(name, options)
    if name in ("blended", "wanet"):
        options["seed"] = seed
    return cls(tuple(input_shape), **options)
