"""Attacks by name: the self-describing attack classes, and named cascades.

Each class says what it is (`name`, `norms`, `minimal_norm`, `black_box`, `default_steps`)
and how to build itself from an evaluator's budget (`Attack.build`), so a name asked for with
a norm it does not support is an error naming the ones it does, never a silently different
threat model. A cascade is a list of (attack, budget) stages run by `evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from robust_transfer.attacks.apgd import APGD, APGDDLR, APGDT
from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.fab import FAB, FABT
from robust_transfer.attacks.gradient import BIM, FGSM, PGD
from robust_transfer.attacks.minimal import CW, LBFGS, DeepFool
from robust_transfer.attacks.square import Square
from robust_transfer.attacks.threats import make_threat
from robust_transfer.errors import UserError

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (FGSM, BIM, PGD, APGD, APGDDLR, APGDT, FAB, FABT, Square, CW, DeepFool, LBFGS)
}


@dataclass(frozen=True)
class Stage:
    """One attack of a cascade with its budget (None: the attack's `default_steps`)."""

    attack: str
    steps: int | None = None


# AutoAttack's standard version (Croce & Hein 2020, arXiv 2003.01690): APGD-CE (100 it.),
# APGD-T (9 targets x 100 it.), FAB-T (9 targets x 100 it.), Square (5,000 queries).
CASCADES: dict[str, tuple[Stage, ...]] = {
    "autoattack": (Stage("apgd-ce", 100), Stage("apgd-t", 100), Stage("fab-t", 100),
                   Stage("square", 5000)),
    # Same order at about a fifth of the budget: a quick first look, not a final number.
    "autoattack-fast": (Stage("apgd-ce", 20), Stage("apgd-t", 20), Stage("fab-t", 20),
                        Stage("square", 1000)),
}
AUTOATTACK = CASCADES["autoattack"]


def names_help() -> str:
    """One line listing every attack and cascade name, for --help and error messages."""
    return "attacks: " + ", ".join(sorted(ATTACKS)) + "; cascades: " + ", ".join(CASCADES)


def attack_class(name: str) -> type[Attack]:
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; {names_help()}")
    return ATTACKS[name]


def stages(names: list[str] | tuple[str, ...], steps: int | None = None) -> list[Stage]:
    """Attack and cascade names -> stages; `steps` (if given) overrides every budget."""
    if not names:
        raise UserError(f"no attack given; {names_help()}")
    if steps is not None and steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    out = []
    for name in names:
        if name in CASCADES:
            out += [Stage(s.attack, steps or s.steps) for s in CASCADES[name]]
        else:
            attack_class(name)
            out.append(Stage(name, steps))
    return out


def check_norm(names: list[str] | tuple[str, ...], norm: str) -> None:
    """`UserError` unless every named attack (cascades expanded) supports `norm`."""
    make_threat(norm, 0.0)
    for stage in stages(names):
        attack_class(stage.attack).check_norm(norm)


def make_attack(
    name: str,
    model: nn.Module,
    eps: float = 8 / 255,
    norm: str = "linf",
    steps: int | None = None,
    seed: int = 0,
    bpda: bool = False,
    eot_samples: int = 1,
) -> Attack:
    """The attack called `name` at (norm, eps) with `steps` iterations/queries (None: its
    published default), with the adaptive options `bpda` and `eot_samples`
    (`Attack.set_adaptive`). An unknown name or an unsupported norm or option is a
    `UserError`."""
    cls = attack_class(name)
    cls.check_norm(norm)
    make_threat(norm, eps)  # validates eps
    if steps is not None and steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    return cls.build(model, eps, norm, steps, seed).set_adaptive(bpda, eot_samples)
