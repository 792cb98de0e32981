"""Input defenses by name (`INPUT_DEFENSES`), and defense lists as the CLI writes them:
`squeeze-bits:4,median:2,random-resize`.

A defense plugin (`robust_transfer.plugins`) is an `InputTransform` subclass with a `name` and
an `Options` dataclass whose fields are its constructor's keyword arguments (the first is the
parameter `name:N` sets); a `randomized` one also takes `seed`, so every random draw of a
defense comes from the seed its caller gives (`DefenseSpec.transforms(seed)`). Adding one is
its class and its name in the registration below.

Commas separate defenses (each evaluated on its own); `+` chains transforms into one defense
(`squeeze-bits:4+median:2`); `:N` is optional where a default exists. Parsed once, at the
edge, into `DefenseSpec`s of typed options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from robust_transfer.attacks.adaptive import InputTransform
from robust_transfer.defenses.randomization import RandomResizePad
from robust_transfer.defenses.squeeze import BitDepth, MedianSmoothing
from robust_transfer.defenses.wrap import Defended, chain_seeds
from robust_transfer.errors import UserError
from robust_transfer.plugins import Registry

INPUT_DEFENSES: Registry[InputTransform] = Registry("input defense")
for _defense in (BitDepth, MedianSmoothing, RandomResizePad):
    INPUT_DEFENSES.register(_defense)


def build_defense(name: str, options: Any, seed: int) -> InputTransform:
    """The transform `name` with its typed `options`; a randomized one draws from `seed`."""
    cls = INPUT_DEFENSES.get(name)
    kwargs = asdict(options)
    if cls.randomized:
        kwargs["seed"] = seed
    return cls(**kwargs)


def _parameter(name: str) -> dataclasses.Field:
    """The option `name:N` sets: the first field of the defense's options."""
    return dataclasses.fields(INPUT_DEFENSES.get(name).Options)[0]


def defenses_help() -> str:
    """One line naming every defense and its parameter, for --help and errors."""
    return "defenses: " + ", ".join(f"{n}[:N] (N = {_parameter(n).metadata['help']})"
                                    for n in INPUT_DEFENSES) + \
        "; chain with '+', separate with ','"


@dataclass(frozen=True)
class DefenseSpec:
    """One defense: a chain of (name, typed options) transforms; `label` is its canonical
    text (`name:N` with N the parameter, or `name` where the parameter is unset)."""

    parts: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        texts = []
        for name, options in self.parts:
            value = getattr(options, _parameter(name).name)
            texts.append(name if value is None else f"{name}:{value}")
        return "+".join(texts)

    def transforms(self, seed: int = 0) -> list[InputTransform]:
        """The chain's transforms; its random ones draw from `seed` (the first one from `seed`
        itself, each later one from its own stream, `wrap.chain_seeds`)."""
        randomized = [INPUT_DEFENSES.get(n).randomized for n, _ in self.parts]
        return [build_defense(n, o, s) for (n, o), s in
                zip(self.parts, chain_seeds(seed, randomized), strict=True)]

    def build(self, model: nn.Module, seed: int = 0) -> Defended:
        """The defended model; random transforms draw from `seed`."""
        return Defended(model, *self.transforms(seed))


def _part(text: str) -> tuple[str, Any]:
    name, sep, param = text.partition(":")
    name = name.strip().lower()
    if name not in INPUT_DEFENSES:
        raise UserError(f"unknown defense {name!r}; {defenses_help()}")
    values = {}
    if sep:
        field = _parameter(name)
        try:
            values[field.name] = int(param.strip())
        except ValueError:
            raise UserError(f"defense {name!r} takes an integer parameter "
                            f"({field.metadata['help']}), got {param.strip()!r}") from None
    options = INPUT_DEFENSES.options(name, values)
    build_defense(name, options, 0)  # range checks: the transform's own UserError
    return name, options


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
