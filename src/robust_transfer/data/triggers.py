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

Each is a plugin (`robust_transfer.plugins`): a class with a `name` and a typed `Options`
dataclass (its settings, defaults and one-line help), registered in `TRIGGERS`. The options
come from a spec's `trigger_options:` mapping or the CLI's `--trigger-option KEY=VALUE`, both
checked against the dataclass; `TRIGGERS.options_help()` lists them for `--help`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from robust_transfer.data.wanet import WaNet
from robust_transfer.errors import UserError
from robust_transfer.plugins import Registry, build_options, option

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")
Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]


class Trigger(Protocol):
    """`apply(x)`: (N, C, H, W) images in [0,1] -> triggered images, same shape, in [0,1].

    A trigger class also has `Options` (its typed settings) and `seeded` (whether `seed`
    draws its pattern), and may have `cover_examples(x, poisoned, generator)`: further
    images a poisoned set changes but keeps the labels of (WaNet's noise mode)."""

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
    seeded = False  # no random pattern

    @dataclass(frozen=True)
    class Options:
        size: int | None = option(None, "side of the square in pixels (default: 3/32 of the "
                                  "image side, at least 2)")
        margin: int = option(0, "pixels between the square and the image edges")
        value: float = option(1.0, "the square's pixel value, in [0, 1]")
        corner: Corner = option("bottom-right", "where the square goes")

    def __init__(self, input_shape: tuple[int, int, int], options: Options | None = None,
                 **values) -> None:
        o = options or build_options(self.Options, values, "trigger 'badnets'")
        _, h, w = input_shape
        self.input_shape, self.corner = tuple(input_shape), o.corner
        self.size = max(2, round(3 * min(h, w) / 32)) if o.size is None else o.size
        self.margin = o.margin
        if self.size < 1 or self.margin < 0:
            raise UserError(f"badnets patch size must be >= 1 and margin >= 0, got "
                            f"{self.size}, {self.margin}")
        if self.size + self.margin > min(h, w):
            raise UserError(f"badnets patch of {self.size}x{self.size} (margin {self.margin}) "
                            f"does not fit an image of {h}x{w}")
        if not 0.0 <= o.value <= 1.0:
            raise UserError(f"badnets patch value must be in [0, 1], got {o.value}")
        self.value = o.value

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
    seeded = True  # the pattern

    @dataclass(frozen=True)
    class Options:
        alpha: float = option(0.2, "blend weight of the random pattern, in (0, 1]")

    def __init__(self, input_shape: tuple[int, int, int], options: Options | None = None,
                 seed: int = 0, **values) -> None:
        o = options or build_options(self.Options, values, "trigger 'blended'")
        if not 0.0 < o.alpha <= 1.0:
            raise UserError(f"blended alpha must be in (0, 1], got {o.alpha}")
        self.input_shape, self.alpha = tuple(input_shape), o.alpha
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
    seeded = False

    @dataclass(frozen=True)
    class Options:
        delta: float = option(20 / 255, "amplitude of the sinusoid, in (0, 1]")
        frequency: int | None = option(None, "cycles across the width (default: 6, at most "
                                       "W/4)")

    def __init__(self, input_shape: tuple[int, int, int], options: Options | None = None,
                 **values) -> None:
        o = options or build_options(self.Options, values, "trigger 'sig'")
        _, _, w = input_shape
        if not 0.0 < o.delta <= 1.0:
            raise UserError(f"sig delta must be in (0, 1], got {o.delta}")
        self.input_shape, self.delta = tuple(input_shape), o.delta
        self.frequency = min(6, max(1, w // 4)) if o.frequency is None else o.frequency
        if not 1 <= self.frequency <= w // 2:
            raise UserError(f"sig frequency must be 1..{w // 2} on width {w}, "
                            f"got {self.frequency}")
        j = torch.arange(w, dtype=torch.float32)
        self.signal = self.delta * torch.sin(2 * math.pi * j * self.frequency / w)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, self.input_shape, self.name)
        return (x + self.signal.to(x.device, x.dtype)).clamp(0.0, 1.0)


# The one place a trigger's name maps to its class: adding a trigger is its class (with its
# `Options`) and one line here.
TRIGGERS: Registry = Registry("trigger")
for _cls in (BadNets, Blended, SIG, WaNet):
    TRIGGERS.register(_cls)


def make_trigger(name: str, input_shape: tuple[int, int, int], seed: int = 0,
                 **options) -> Trigger:
    """The trigger called `name` (one of `TRIGGERS`) for images of `input_shape` (C, H, W).

    `seed` fixes a random pattern (triggers with `seeded`: blended, wanet); `options` are the
    trigger's `Options` fields (`TRIGGERS.options_help()`). An unknown name, an unknown option
    or one of the wrong type, or a patch larger than the image is a `UserError`.
    """
    cls = TRIGGERS.get(name)
    if len(input_shape) != 3:
        raise UserError(f"input shape must be (C, H, W), got {tuple(input_shape)}")
    seeded = {"seed": seed} if cls.seeded else {}
    return TRIGGERS.build(name, tuple(input_shape), options=options, **seeded)
