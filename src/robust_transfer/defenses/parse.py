"""Defense lists as the CLI writes them: `squeeze-bits:4,median:2,random-resize`.

Commas separate defenses (each evaluated on its own); `+` chains transforms into one defense
(`squeeze-bits:4+median:2`); `:N` is the transform's integer parameter, optional where a
default exists. Parsed once, at the edge, into `DefenseSpec`s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from robust_transfer.attacks.adaptive import InputTransform
from robust_transfer.defenses.randomization import RandomResizePad
from robust_transfer.defenses.squeeze import BitDepth, MedianSmoothing
from robust_transfer.defenses.wrap import Defended
from robust_transfer.errors import UserError

# name -> (what its parameter is, default (None: the transform's own), builder(param, seed))
DEFENSES: dict[str, tuple[str, int | None, Callable[[int | None, int], InputTransform]]] = {
    "squeeze-bits": ("bits, 1..16", 4, lambda p, seed: BitDepth(p)),
    "median": ("window side, 2..9", 2, lambda p, seed: MedianSmoothing(p)),
    "random-resize": ("canvas side > image side; default max(round(1.107 H), H + 2)", None,
                      lambda p, seed: RandomResizePad(p, seed)),
}


def defenses_help() -> str:
    """One line naming every defense and its parameter, for --help and errors."""
    return "defenses: " + ", ".join(f"{n}[:N] (N = {d[0]})" for n, d in DEFENSES.items()) + \
        "; chain with '+', separate with ','"


@dataclass(frozen=True)
class DefenseSpec:
    """One defense: a chain of (name, parameter) transforms; `label` is its canonical text."""

    parts: tuple[tuple[str, int | None], ...]

    @property
    def label(self) -> str:
        return "+".join(n if p is None else f"{n}:{p}" for n, p in self.parts)

    def transforms(self, seed: int = 0) -> list[InputTransform]:
        return [DEFENSES[n][2](p, seed) for n, p in self.parts]

    def build(self, model: nn.Module, seed: int = 0) -> Defended:
        """The defended model; random transforms draw from `seed`."""
        return Defended(model, *self.transforms(seed))


def _part(text: str) -> tuple[str, int | None]:
    name, sep, param = text.partition(":")
    name = name.strip().lower()
    if name not in DEFENSES:
        raise UserError(f"unknown defense {name!r}; {defenses_help()}")
    what, default, build = DEFENSES[name]
    if not sep:
        value = default
    else:
        try:
            value = int(param.strip())
        except ValueError:
            raise UserError(f"defense {name!r} takes an integer parameter ({what}), got "
                            f"{param.strip()!r}") from None
    build(value, 0)  # range checks: the transform's own UserError
    return name, value


def parse_defenses(text: str | list[str]) -> list[DefenseSpec]:
    """`"squeeze-bits:4,median:2,random-resize"` -> DefenseSpecs, in order, without
    duplicates. Unknown names and bad parameters are `UserError`s naming what is allowed."""
    items = [text] if isinstance(text, str) else list(text)
    specs: list[DefenseSpec] = []
    for item in items:
        for chunk in item.split(","):
            if not chunk.strip():
                continue
            parts = tuple(_part(p) for p in chunk.split("+"))
            spec = DefenseSpec(parts)
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise UserError(f"no defense given; {defenses_help()}")
    return specs
