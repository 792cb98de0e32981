"""Data poisoning: a training set with a trigger stamped on some images, made on the fly.

BadNets-style poisoning (Gu et al. 2017; defaults from BackdoorBench): pick `rate` of the
training images with a seed, apply the trigger, and relabel them to the target class
(all-to-one) or to the next class (all-to-all, y -> (y + 1) mod K). Clean-label poisoning
(Turner et al. 2019; SIG, Barni et al. 2019) keeps every label and triggers only images of the
target class, so the model learns "trigger -> target" from correctly labelled data.

Which images are poisoned is returned (and recorded by the caller), so defenses such as ABL
can be scored on how many of them they isolate.

How many: dirty-label poisons round(rate * N) images of the N in the set, drawn from the
images that a poison can change (all-to-one: those not already of the target class; at most
all of them); clean-label poisons round(rate * N_target) of the target class's images (with
`also_classes`: of those classes' images too). At least one image is poisoned. A trigger with
a noise mode (WaNet, `data.wanet`) also warps round(cross_ratio * poisoned) other images with
noise, keeping their labels.

A backdoor attack is a plugin of `BACKDOOR_ATTACKS` (`robust_transfer.plugins`): it plants the
backdoor (`poison`: the training set it trains on; `feature_targets`: what it adds to the
training loss, None for a poisoning attack) and gives the triggers that probe it (`triggers`).
Every trigger is a poisoning attack of the same name (`Poisoning`); NeuBA (`data.neuba`) is
planted by the loss on clean data, with several triggers and no target label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from robust_transfer.data.datasets import ImageSet
from robust_transfer.data.neuba import FeatureTargets, NeuBAAttack
from robust_transfer.data.triggers import TRIGGERS, Trigger, make_trigger
from robust_transfer.errors import UserError, check_choice
from robust_transfer.plugins import NoOptions, Registry

LABELS = ("all-to-one", "all-to-all")


class BackdoorAttack(Protocol):
    """A way to plant a backdoor, built from its `BackdoorConfig` (`cfg.attack_plugin()`).

    `task_agnostic`: it has no target label (its ASR is the share sent to the most common
    label). `typed_options(name, values)`: the typed options `trigger_options` gives it.
    """

    name: str
    task_agnostic: bool

    @classmethod
    def typed_options(cls, name: str, values: dict[str, Any]) -> Any: ...

    def poison(self, data: ImageSet, num_classes: int) -> tuple[ImageSet, torch.Tensor]:
        """(the training set the backdoored model trains on, sorted poisoned indices)."""

    def triggers(self, input_shape: tuple[int, int, int]) -> list[Trigger]:
        """The triggers that activate the backdoor (the attacker uses whichever works)."""

    def feature_targets(self, input_shape: tuple[int, int, int],
                        feature_dim: int) -> FeatureTargets | None:
        """What the training loss adds to plant it (None: the poisoned data does it)."""


@dataclass(frozen=True)
class BackdoorConfig:
    """A backdoor to plant: which trigger (`attack`), poison `rate` in (0, 1], `target`
    class, `labels` all-to-one | all-to-all, `clean_label`, and the `seed` that picks the
    poisoned images and fixes the trigger's random pattern. Objective attacks (NeuBA) are
    task-agnostic: their `target` may be None, and `rate` is theirs to interpret.
    `also_classes` (clean-label only): further classes whose images carry the trigger beside
    the target's (a spurious feature on several classes, as in bias transfer); `rate` is then
    of all those classes' images. `trigger_options`: the attack's options, for a poisoning
    attack its trigger's `Options` (e.g. wanet's {k: 4, s: 0.5, cross_ratio: 2}, blended's
    {alpha: 0.2}; `TRIGGERS.options_help()`), for NeuBA `NeuBAAttack.Options`.

    Example:
        cfg = BackdoorConfig("badnets", rate=0.1, target=0)
        poisoned, index = poison(task.train, cfg, task.num_classes)
    """

    attack: str = "badnets"
    rate: float = 0.1
    target: int | None = 0
    labels: str = "all-to-one"
    clean_label: bool = False
    seed: int = 0
    patch_size: int | None = None  # badnets only: the patch's side (None: scaled to the image)
    also_classes: tuple[int, ...] = ()
    trigger_options: tuple[tuple[str, object], ...] = ()  # a mapping, kept sorted and hashable

    def __post_init__(self) -> None:
        self._check_also_classes()
        attack = BACKDOOR_ATTACKS.get(self.attack)
        options = dict(self.trigger_options)  # a dict from YAML / JSON / the CLI
        object.__setattr__(self, "trigger_options", tuple(sorted(options.items())))
        if options:
            attack.typed_options(self.attack, options)
            if "size" in options and self.patch_size is not None:
                raise UserError("give the badnets patch size once: patch_size or "
                                "trigger_options.size")
        check_choice("backdoor labels", self.labels, LABELS)
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) \
                or not 0.0 < self.rate <= 1.0:
            raise UserError(f"poison rate must be in (0, 1], got {self.rate!r}")
        if self.patch_size is not None and self.attack != "badnets":
            raise UserError(f"patch size applies to the badnets trigger only, not "
                            f"{self.attack!r}")
        if self.clean_label and self.labels != "all-to-one":
            raise UserError("clean-label poisoning needs all-to-one labels (it poisons only "
                            "target-class images)")
        if self.target is None and attack.task_agnostic:
            return
        if isinstance(self.target, bool) or not isinstance(self.target, int) or self.target < 0:
            raise UserError(f"backdoor target class must be an integer >= 0, got "
                            f"{self.target!r}")

    def _check_also_classes(self) -> None:
        classes = tuple(self.also_classes)  # a list from YAML / JSON
        object.__setattr__(self, "also_classes", classes)
        if not classes:
            return
        if not self.clean_label:
            raise UserError("further poisoned classes (also_classes) need clean-label poisoning")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in classes) \
                or len(set(classes)) != len(classes) or self.target in classes:
            raise UserError(f"also_classes must be distinct integers >= 0 other than the "
                            f"target, got {list(classes)}")

    @property
    def classes(self) -> tuple[int, ...]:
        """The classes whose images a clean-label poison triggers: the target, then
        `also_classes`."""
        return (self.target, *self.also_classes)

    def to_dict(self) -> dict:
        """The config as a dict; `patch_size`, `also_classes` and `trigger_options` only when
        set (older records lack them, and the ids of configs without them stay the same)."""
        d = asdict(self)
        d["trigger_options"] = dict(self.trigger_options)
        if not self.trigger_options:
            d.pop("trigger_options")
        if not self.also_classes:
            d.pop("also_classes")
        else:
            d["also_classes"] = list(self.also_classes)
        if self.patch_size is None:
            d.pop("patch_size")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BackdoorConfig:
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise UserError(f"unknown backdoor key(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(sorted(allowed))}")
        return cls(**d)

    def check(self, num_classes: int) -> None:
        """`UserError` unless the target class exists in a task of `num_classes` classes."""
        for extra in self.also_classes:
            if extra >= num_classes:
                raise UserError(f"poisoned class {extra} does not exist: the task has classes "
                                f"0..{num_classes - 1}")
        if self.target is not None and self.target >= num_classes:
            raise UserError(f"backdoor target class {self.target} does not exist: the task "
                            f"has classes 0..{num_classes - 1}")

    def attack_plugin(self) -> BackdoorAttack:
        """The plugin that plants this backdoor and gives its triggers."""
        return BACKDOOR_ATTACKS.get(self.attack)(self)

    def trigger(self, input_shape: tuple[int, int, int]) -> Trigger:
        """This backdoor's trigger for images of `input_shape` (its pattern from `seed`), or a
        `UserError` for an attack with several (NeuBA: `attack_plugin().triggers`)."""
        triggers = self.attack_plugin().triggers(input_shape)
        if len(triggers) != 1:
            raise UserError(f"backdoor attack {self.attack!r} has {len(triggers)} triggers, "
                            "not a single data trigger")
        return triggers[0]

    def backdoor_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The labels the backdoor wants for triggered images whose true labels are `y`."""
        if self.labels == "all-to-all":
            return (y + 1) % num_classes
        return torch.full_like(y, self.target)


def poison_candidates(y: torch.Tensor, cfg: BackdoorConfig) -> torch.Tensor:
    """Indices of the images `cfg` may poison (see the module docstring)."""
    if cfg.clean_label:
        return torch.nonzero(torch.isin(y, torch.tensor(cfg.classes))).flatten()
    if cfg.labels == "all-to-one":
        return torch.nonzero(y != cfg.target).flatten()
    return torch.arange(len(y))


def poison_count(y: torch.Tensor, cfg: BackdoorConfig) -> int:
    """How many images `cfg` poisons in a set with labels `y`."""
    n = int(torch.isin(y, torch.tensor(cfg.classes)).sum()) if cfg.clean_label else len(y)
    available = len(poison_candidates(y, cfg))
    if available == 0:
        raise UserError(f"nothing to poison: no image can carry backdoor {cfg.attack!r} "
                        f"(target {cfg.target}, clean-label {cfg.clean_label})")
    return min(available, max(1, round(cfg.rate * n)))


def poison(data: ImageSet, cfg: BackdoorConfig,
           num_classes: int) -> tuple[ImageSet, torch.Tensor]:
    """(copy of `data` with `cfg`'s backdoor planted, sorted indices of the poisoned images):
    `cfg.attack_plugin().poison` (an attack planted by the loss leaves the data clean).

    Shape: data.x (N, C, H, W) -> same; index (round(rate * N),) int64.
    """
    cfg.check(num_classes)
    return cfg.attack_plugin().poison(data, num_classes)


class Poisoning:
    """A poisoning attack (BadNets, Blended, SIG, WaNet; module docstring): the indices drawn
    with `cfg.seed`; the poisoned images carry `cfg`'s trigger and, unless clean-label, the
    backdoor label; the other images are unchanged. Registered under every trigger's name;
    its options are the trigger's."""

    task_agnostic = False
    Options = NoOptions  # its options are its trigger's: `typed_options`

    @staticmethod
    def typed_options(name: str, values: dict[str, Any]) -> Any:
        return TRIGGERS.options(name, values)

    def __init__(self, cfg: BackdoorConfig) -> None:
        self.cfg, self.name = cfg, cfg.attack

    def triggers(self, input_shape: tuple[int, int, int]) -> list[Trigger]:
        cfg = self.cfg
        options = dict(cfg.trigger_options)
        if cfg.patch_size is not None:
            options["size"] = cfg.patch_size
        return [make_trigger(cfg.attack, input_shape, seed=cfg.seed, **options)]

    def feature_targets(self, input_shape: tuple[int, int, int], feature_dim: int) -> None:
        return None

    def poison(self, data: ImageSet, num_classes: int) -> tuple[ImageSet, torch.Tensor]:
        cfg = self.cfg
        candidates = poison_candidates(data.y, cfg)
        k = poison_count(data.y, cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        index = candidates[torch.randperm(len(candidates), generator=gen)[:k]].sort().values
        x, y = data.x.clone(), data.y.clone()
        (trigger,) = self.triggers(tuple(data.x.shape[1:]))
        x[index] = trigger.apply(data.x[index])
        cover = getattr(trigger, "cover_examples", None)  # optional: WaNet's noise mode
        if cover is not None:
            cross, images = cover(data.x, index, gen)
            x[cross] = images
        if not cfg.clean_label:
            y[index] = cfg.backdoor_labels(data.y[index], num_classes)
        return ImageSet(x, y), index


# The one place a backdoor attack's name maps to its class.
BACKDOOR_ATTACKS: Registry = Registry("backdoor attack")
for _name in TRIGGERS:
    BACKDOOR_ATTACKS.add(_name, Poisoning)
BACKDOOR_ATTACKS.register(NeuBAAttack)
