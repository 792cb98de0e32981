"""Backdoor removal: fine-tuning (FT), super-fine-tuning, fine-pruning and ABL, each scored by
C-Acc / ASR / RA before and after, the share of clean data it used, and its sequela.

- FT: fine-tune every layer on a small clean subset (BackdoorBench's FT: 5% clean data).
- Super-fine-tuning (Sha et al. 2022, "Fine-tuning is all you need to mitigate backdoor
  attacks"): the same clean data, two phases of triangular cyclic learning rate, the second
  with a lower peak (here a tenth).
- Fine-pruning (Liu et al. 2018, "Fine-pruning: defending against backdooring attacks on deep
  neural networks"): rank the last conv block's channels by mean activation on clean data,
  prune the most dormant one at a time (`prune_step` channels per step, default 1 as Liu et
  al.), stopping before the step after which clean accuracy on that data has dropped by more
  than `prune_drop` (or once `prune_max` of the channels are gone), then fine-tune. A
  pruned channel is removed by zeroing its conv filter and its BatchNorm scale and shift, so
  the block outputs exactly zero there (and the checkpoint stays a plain model); it stays
  zero through fine-tuning (ReLU passes no gradient at 0) and is re-zeroed after it.
- ABL (`backdoors.abl`): trains a fresh model on the poisoned training set; it uses all of it.
- ANP (`backdoors.anp`, Wu & Wang 2021): learns per-neuron BatchNorm masks under adversarial
  neuron perturbation on the clean data, prunes the neurons whose mask falls to a threshold.

Each defense is a plugin of `DEFENSES` (`robust_transfer.plugins`): a class with a typed
`Options` (its own knobs: fine-pruning's prune drop / max / step, ABL's `ABLConfig`, ANP's
`ANPConfig`, ...) and `run`, which `defend` dispatches to. `DefenseConfig` records the shared
budget and every defense's options (its sidecar format unchanged); `with_options` sets them
from `KEY=VALUE`s (the CLI's `--defense-option`).

Sequela ("backdoor sequela", Sha et al. 2022: what removal leaves behind): robust accuracy to
PGD-20 through `attacks.evaluate` (`train.source.evaluate_source`), and vulnerability to a
fresh backdoor — the ASR of a new trigger (blended, another target) after a short poisoned
fine-tune — both before and after removal.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robust_transfer.backdoors.abl import ABLConfig, anti_backdoor_learning
from robust_transfer.backdoors.anp import ANPConfig, adversarial_neuron_pruning
from robust_transfer.backdoors.metrics import backdoor_metrics
from robust_transfer.data import Task, shots_per_class
from robust_transfer.data.poison import BackdoorConfig, poison
from robust_transfer.errors import UserError
from robust_transfer.models import build_model
from robust_transfer.models.runtime import accuracy, eval_mode
from robust_transfer.plugins import Registry, build_options, option
from robust_transfer.train import TrainConfig, fit
from robust_transfer.train.source import evaluate_source


@dataclass(frozen=True)
class SuperFTOptions:
    super_lr: float = option(0.1, "peak learning rate of the first cycle (the second: a "
                             "tenth)")


@dataclass(frozen=True)
class FinePruningOptions:
    prune_drop: float = option(0.05, "stop pruning when clean accuracy drops by more than "
                               "this")
    prune_max: float = option(0.9, "the largest share of the channels pruned")
    prune_step: int = option(1, "channels pruned per step (1: one at a time, as Liu et al.)")


@dataclass(frozen=True)
class DefenseConfig:
    """The defender's budget and settings.

    `clean_fraction` of the task's training set is the clean data FT, super-FT and
    fine-pruning get (drawn per class with `seed`); `epochs` / `lr` their fine-tuning; super-FT
    runs `epochs` per phase with peaks `super_lr` and `super_lr / 10` (Sha et al.'s point is
    the large first peak). `prune_drop`: the clean-accuracy drop at
    which fine-pruning stops; `prune_max`: the most channels it may prune (a share);
    `prune_step`: channels pruned per step (1: Liu et al.'s one at a time). `sequela_eps` /
    `sequela_norm`: the PGD-20 radius of the robustness sequela; `fresh_epochs` / `fresh_lr`: the
    poisoned fine-tune of the fresh-backdoor sequela.
    """

    clean_fraction: float = 0.1
    epochs: int = 10
    lr: float = 0.01
    super_lr: float = SuperFTOptions.super_lr
    batch_size: int = 32
    prune_drop: float = FinePruningOptions.prune_drop
    prune_max: float = FinePruningOptions.prune_max
    prune_step: int = FinePruningOptions.prune_step
    abl: ABLConfig = field(default_factory=ABLConfig)
    anp: ANPConfig = field(default_factory=ANPConfig)
    sequela_eps: float = 0.5
    sequela_norm: str = "l2"
    fresh_epochs: int = 10
    fresh_lr: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.clean_fraction <= 1:
            raise UserError(f"clean fraction must be in (0, 1], got {self.clean_fraction}")
        if not 0 <= self.prune_drop < 1 or not 0 < self.prune_max < 1:
            raise UserError(f"need 0 <= prune drop < 1 and 0 < prune max < 1, got "
                            f"{self.prune_drop}, {self.prune_max}")
        if isinstance(self.prune_step, bool) or not isinstance(self.prune_step, int) \
                or self.prune_step < 1:
            raise UserError(f"prune step must be an integer >= 1, got {self.prune_step}")
        if self.epochs < 1 or self.fresh_epochs < 1 or not min(self.lr, self.super_lr,
                                                                 self.fresh_lr) > 0:
            raise UserError("defense epochs must be >= 1 and learning rates > 0")

    def train(self, epochs: int | None = None, lr: float | None = None,
              schedule: str = "constant") -> TrainConfig:
        return TrainConfig(epochs=epochs or self.epochs, lr=lr or self.lr, schedule=schedule,
                           batch_size=self.batch_size, seed=self.seed)

    def options(self, defense: str) -> Any:
        """`defense`'s typed options as this config holds them: its `config_field` (abl,
        anp), or the fields of the same names (super-ft, fine-pruning)."""
        cls = DEFENSES.get(defense)
        if cls.config_field:
            return getattr(self, cls.config_field)
        return cls.Options(**{f.name: getattr(self, f.name)
                              for f in dataclasses.fields(cls.Options)})

    def with_options(self, values: dict[str, Any], defenses) -> DefenseConfig:
        """This config with `values` (e.g. {"threshold": 0.3}) set in the options of each of
        `defenses` that has them; a key none of them has, or a bad value, is a `UserError`."""
        cfg, used = self, set()
        for name in dict.fromkeys(defenses):
            cls = DEFENSES.get(name)
            mine = {k: v for k, v in values.items()
                    if k in {f.name for f in dataclasses.fields(cls.Options)}}
            if not mine:
                continue
            used |= set(mine)
            current = {f.name: getattr(cfg.options(name), f.name)
                       for f in dataclasses.fields(cls.Options)}
            typed = build_options(cls.Options, {**current, **mine}, f"backdoor defense {name!r}")
            cfg = dataclasses.replace(cfg, **({cls.config_field: typed} if cls.config_field
                                              else dataclasses.asdict(typed)))
        unknown = sorted(set(values) - used)
        if unknown:
            allowed = sorted({f.name for n in dict.fromkeys(defenses)
                              for f in dataclasses.fields(DEFENSES.get(n).Options)})
            raise UserError(f"unknown defense option(s) {', '.join(unknown)} for "
                            f"{', '.join(dict.fromkeys(defenses))}; allowed: "
                            f"{', '.join(allowed) or 'none'}")
        return cfg


def clean_subset(task: Task, fraction: float, seed: int):
    """The defender's clean data: `fraction` of each class of the clean training set."""
    per_class = max(1, int(fraction * int(torch.bincount(task.train.y).min())))
    return task.train.subset(shots_per_class(task.train.y, per_class, seed))


# ---- FT and super-FT ----------------------------------------------------------------------

def fine_tune(model: nn.Module, clean, cfg: DefenseConfig) -> nn.Module:
    """FT: every layer, constant `cfg.lr`, on the clean data."""
    model.requires_grad_(True)
    fit(model, clean, cfg.train())
    return model


def super_fine_tune(model: nn.Module, clean, cfg: DefenseConfig) -> nn.Module:
    """Super-FT (Sha et al. 2022): two triangular cycles, peaks `super_lr`, `super_lr / 10`."""
    model.requires_grad_(True)
    fit(model, clean, cfg.train(lr=cfg.super_lr, schedule="triangular"))
    fit(model, clean, cfg.train(lr=cfg.super_lr / 10, schedule="triangular"))
    return model


# ---- fine-pruning -------------------------------------------------------------------------

def last_conv_block(model: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """The conv and BatchNorm of the model's last block."""
    block = model.blocks[-1]
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    if not convs or not norms:
        raise UserError("fine-pruning needs a last block with a conv and a BatchNorm layer")
    return convs[-1], norms[-1]


@torch.no_grad()
def channel_activity(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Mean activation per channel of the last block's output on `x` (N, C, H, W)."""
    name = model.block_names[-1]
    device = next(model.parameters()).device
    with eval_mode(model):
        sums = sum(model.forward_to(x[i : i + batch_size].to(device), name).sum((0, 2, 3))
                   for i in range(0, len(x), batch_size))
        h, w = model.forward_to(x[:1].to(device), name).shape[2:]
    return (sums / (len(x) * h * w)).cpu()


@torch.no_grad()
def prune_channels(model: nn.Module, channels: torch.Tensor) -> None:
    """Remove `channels` of the last conv block: zero filter, BN scale and BN shift."""
    conv, norm = last_conv_block(model)
    channels = channels.to(conv.weight.device)
    conv.weight[channels] = 0
    if conv.bias is not None:
        conv.bias[channels] = 0
    norm.weight[channels] = 0
    norm.bias[channels] = 0


def choose_pruned(model: nn.Module, clean, cfg: DefenseConfig) -> torch.Tensor:
    """The channels fine-pruning removes: the most dormant first (mean activation on the
    clean data), `cfg.prune_step` more per step, as many as keep clean accuracy within
    `cfg.prune_drop` of the unpruned model's (Liu et al.'s stop rule)."""
    order = torch.argsort(channel_activity(model, clean.x), stable=True)
    limit = accuracy(model, clean.x, clean.y) - cfg.prune_drop
    step = cfg.prune_step
    trial = copy.deepcopy(model)  # pruning only adds channels: prune each step's on one copy
    chosen = order[:0]
    for n in range(step, int(cfg.prune_max * len(order)) + 1, step):
        prune_channels(trial, order[n - step:n])
        if accuracy(trial, clean.x, clean.y) < limit:
            break
        chosen = order[:n]
    return chosen.sort().values


def fine_prune(model: nn.Module, clean, cfg: DefenseConfig) -> tuple[nn.Module, torch.Tensor]:
    """Fine-pruning (Liu et al. 2018): prune `choose_pruned`, fine-tune, re-zero."""
    pruned = choose_pruned(model, clean, cfg)
    prune_channels(model, pruned)
    fine_tune(model, clean, cfg)
    prune_channels(model, pruned)
    return model, pruned


# ---- scoring ------------------------------------------------------------------------------

def fresh_backdoor(backdoor: BackdoorConfig, num_classes: int) -> BackdoorConfig:
    """The sequela's new backdoor: blended (or badnets, if the old one was blended), another
    target, another seed."""
    target = backdoor.target if backdoor.target is not None else 0
    attack = "badnets" if backdoor.attack == "blended" else "blended"
    return BackdoorConfig(attack, rate=0.2, target=(target + 1) % num_classes,
                          seed=backdoor.seed + 1)


def sequela(model: nn.Module, task: Task, clean, backdoor: BackdoorConfig,
            cfg: DefenseConfig) -> dict:
    """Robust accuracy to PGD-20 and the ASR of a fresh backdoor after a short poisoned
    fine-tune of a copy of `model` on the clean data."""
    robust = evaluate_source(model, task.name, cfg.sequela_eps, cfg.sequela_norm)
    fresh = fresh_backdoor(backdoor, task.num_classes)
    poisoned, _ = poison(clean, fresh, task.num_classes)
    attacked = copy.deepcopy(model).requires_grad_(True)
    fit(attacked, poisoned, cfg.train(epochs=cfg.fresh_epochs, lr=cfg.fresh_lr))
    m = backdoor_metrics(attacked, task.test.x, task.test.y, fresh.trigger(task.input_shape),
                         fresh.target)
    return {"robust_accuracy": robust["robust_accuracy"], "fresh_asr": m["asr"]}


def score(model: nn.Module, task: Task, clean, backdoor: BackdoorConfig,
          cfg: DefenseConfig) -> dict:
    """C-Acc / ASR / RA on the test set, plus the sequela."""
    target = backdoor.target if backdoor.labels == "all-to-one" else None
    m = backdoor_metrics(model, task.test.x, task.test.y, backdoor.trigger(task.input_shape),
                         target, backdoor.labels)
    return {"clean_accuracy": m["clean_accuracy"], "asr": m["asr"], "ra": m["ra"],
            **sequela(model, task, clean, backdoor, cfg)}


@dataclass(frozen=True)
class Defender:
    """What a defense may use: the task the backdoored model was trained on, the defender's
    clean data, the backdoor (ABL rebuilds the poisoned set from it), the budget, the source's
    optimiser and the indices it was poisoned at (to score ABL's isolation)."""

    task: Task
    clean: Any
    backdoor: BackdoorConfig
    cfg: DefenseConfig
    source_train: TrainConfig | None = None
    poisoned_index: torch.Tensor | None = None


class Defense:
    """A backdoor defense plugin: `name`, typed `Options` (kept in `DefenseConfig`: under
    `config_field`, or as fields of the same names when None) and `run`."""

    name: str
    config_field: str | None = None

    def __init__(self, options: Any = None) -> None:
        self.options = options

    def run(self, model: nn.Module, d: Defender) -> tuple[nn.Module, dict]:
        """(the defended model, details for the defense's row) from a copy of the
        backdoored `model`, which it may change."""
        raise NotImplementedError


class FineTuning(Defense):
    """FT: every layer on the clean data (BackdoorBench's FT)."""

    name = "ft"

    def run(self, model: nn.Module, d: Defender) -> tuple[nn.Module, dict]:
        fine_tune(model, d.clean, d.cfg)
        return model, {}


class SuperFineTuning(Defense):
    """Super-FT (Sha et al. 2022): two triangular cycles, peaks `super_lr`, `super_lr / 10`."""

    name = "super-ft"
    Options = SuperFTOptions

    def run(self, model: nn.Module, d: Defender) -> tuple[nn.Module, dict]:
        super_fine_tune(model, d.clean, d.cfg)
        return model, {}


class FinePruning(Defense):
    """Fine-pruning (Liu et al. 2018): `fine_prune`."""

    name = "fine-pruning"
    Options = FinePruningOptions

    def run(self, model: nn.Module, d: Defender) -> tuple[nn.Module, dict]:
        model, pruned = fine_prune(model, d.clean, d.cfg)
        return model, {"pruned_channels": len(pruned)}


class ANP(Defense):
    """ANP (Wu & Wang 2021), `backdoors.anp`: prunes the neurons whose masks fall."""

    name = "anp"
    Options = ANPConfig
    config_field = "anp"

    def run(self, model: nn.Module, d: Defender) -> tuple[nn.Module, dict]:
        model, pruned = adversarial_neuron_pruning(model, d.clean, self.options, d.cfg.seed)
        return model, {"pruned_neurons": pruned}


class ABL(Defense):
    """ABL (Li et al. 2021), `backdoors.abl`: retrains a fresh model (seeded) on the poisoned
    training set, rebuilt from the backdoor, with the source's optimiser; reports how many of
    its isolated examples are among the poisoned ones."""

    name = "abl"
    Options = ABLConfig
    config_field = "abl"

    def run(self, model: nn.Module, d: Defender) -> tuple[nn.Module, dict]:
        task = d.task
        data, index = poison(task.train, d.backdoor, task.num_classes)
        if d.poisoned_index is not None:
            index = d.poisoned_index
        fresh = build_model(model.spec, seed=d.cfg.seed).to(next(model.parameters()).device)
        fresh, isolated = anti_backdoor_learning(fresh, data, d.source_train or TrainConfig(),
                                                 self.options)
        return fresh, {"clean_data_fraction": 1.0, "isolated": len(isolated),
                       "isolated_poisoned": int(torch.isin(isolated, index.cpu()).sum())}


# The one place a defense's name maps to its class.
DEFENSES: Registry = Registry("backdoor defense")
for _cls in (FineTuning, SuperFineTuning, FinePruning, ABL, ANP):
    DEFENSES.register(_cls)


def defend(model: nn.Module, defense: str, task: Task, backdoor: BackdoorConfig,
           cfg: DefenseConfig = DefenseConfig(), source_train: TrainConfig | None = None,
           poisoned_index: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """Apply `defense` (a `DEFENSES` plugin, with its options from `cfg.options`) to a copy
    of backdoored `model` (trained on `task` with `backdoor`); return (defended model,
    {defense, clean_data_fraction, seconds, and the defense's details}).

    ABL retrains from scratch on the poisoned training set (rebuilt from `backdoor`) with the
    source's optimiser `source_train`; it reports how many of its isolated examples are in
    `poisoned_index` (the ones the source was poisoned with), when given.
    """
    plugin = DEFENSES.get(defense)(cfg.options(defense))
    start = time.perf_counter()
    clean = clean_subset(task, cfg.clean_fraction, cfg.seed)
    info: dict = {"defense": defense, "clean_data_fraction": len(clean) / len(task.train)}
    defended, details = plugin.run(copy.deepcopy(model), Defender(
        task, clean, backdoor, cfg, source_train, poisoned_index))
    info |= details
    info["seconds"] = time.perf_counter() - start
    return defended.eval(), info


def defense_table(model: nn.Module, defenses: list[str], task: Task, backdoor: BackdoorConfig,
                  cfg: DefenseConfig = DefenseConfig(), source_train: TrainConfig | None = None,
                  poisoned_index: torch.Tensor | None = None,
                  on_defense=None) -> tuple[list[dict], dict[str, nn.Module]]:
    """One row per defense: its info and every score `_before` and `_after` removal."""
    for d in defenses:
        DEFENSES.get(d)
    clean = clean_subset(task, cfg.clean_fraction, cfg.seed)
    before = score(model, task, clean, backdoor, cfg)
    rows, models = [], {}
    for d in defenses:
        defended, info = defend(model, d, task, backdoor, cfg, source_train, poisoned_index)
        after = score(defended, task, clean, backdoor, cfg)
        rows.append({**info, **{f"{k}_before": v for k, v in before.items()},
                     **{f"{k}_after": v for k, v in after.items()}})
        models[d] = defended
        if on_defense is not None:
            on_defense(d)
    return rows, models
