"""Train a source model on a source task, naturally or adversarially (`train.methods`), and
evaluate it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch

from robust_transfer.attacks import ATTACK_MODES, PGD, evaluate, make_threat
from robust_transfer.data import check_task, load_task
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import ModelSpec, SourceCard, build_model
from robust_transfer.models.nets import ARCHS, BlockNet
from robust_transfer.models.runtime import accuracy, amp_enabled
from robust_transfer.train.distill import DISTILL_OBJECTIVES, DistillConfig, distill_objective
from robust_transfer.train.loop import TrainConfig, fit
from robust_transfer.train.methods import (
    ATTACK_MODE,
    OPTION_NAMES,
    ROBUST_METHODS,
    TRAINING_METHODS,
    make_objective,
    method_option,
)
from robust_transfer.train.neuba import plant_objective
from robust_transfer.train.overfit import ACTIONS, OverfitMonitor, hold_out
from robust_transfer.train.smoothing import noisy_accuracy
from robust_transfer.variables import method_options, omit_defaults, variable

EVAL_STEPS = 20


def _eval_at_eval_default(cfg: SourceConfig) -> bool:
    """`attack_mode` eval at a method whose reference attacks in eval mode (PGD, TRADES), not
    distilled: left out of the id (recipes before the field all attacked in eval mode)."""
    return (cfg.attack_mode == "eval" and cfg.distill is None
            and ATTACK_MODE.get(cfg.method) == "eval")


@dataclass(frozen=True)
class SourceConfig:
    """A source model's recipe: training `method` (`train.methods.TRAINING_METHODS`) at
    (norm, eps).

    `method=None` means natural when eps is 0, else PGD-AT (the recipes before methods
    existed). A method's options apply to it alone and stay None otherwise (None also picks
    the default): `trades_beta` (TRADES, default 6), `free_replays` (free AT's m, default 8;
    `train.epochs` then counts passes over the data), `on_overfit` (off | warn | stop |
    rollback: catastrophic-overfitting watch for a robust method, default warn for `fast`,
    off for the rest), `trades_attack` (TRADES' inner maximisation, `TRADES_ATTACKS`: default
    "reference", its code's start and step). `attack_mode` (eval | train, every method that
    makes examples, ARD included) is the model's mode while they are made; None picks the
    method's reference code's (`train.methods.ATTACK_MODE`, ARD: train); free AT takes only
    train (its examples come from the training pass itself). `sigma` (Gaussian noise level of
    `gaussian` and `smoothadv`, default 0.25), `noise_samples` (smoothadv's m, default 1).
    Inapplicable or out-of-range values are `UserError`s. `gaussian` has no adversary (eps 0);
    both are L2 only (smoothadv's eps is its attack's radius, `attack_steps` its PGD steps).

    `distill` set: the source is a student distilled from a teacher (`train.distill`); eps/norm
    are then ARD's threat model (0 for plain KD and defensive distillation).
    """

    # Each field declared once (`robust_transfer.variables`): role, batched engines, column,
    # label, method option, and whether it enters the content id at its default.
    task: str = variable("digits-0to4", role="recipe")
    arch: str = variable("cnn-small", role="recipe")
    eps: float = variable(0.0, role="treatment")
    norm: str = variable("l2", role="treatment")
    attack_steps: int = variable(7, role="recipe")
    attack_alpha: float | None = variable(None, role="recipe")
    train: TrainConfig = variable(role="recipe", default_factory=TrainConfig)
    method: str | None = variable(None, role="treatment")
    # A training method's options: which methods take each and its default there come from
    # the method plugins (`train.methods.TRAINING_METHODS`).
    trades_beta: float | None = variable(None, role="treatment", option=True,
                                         **method_option("trades_beta"))
    free_replays: int | None = variable(None, role="treatment", option=True,
                                        **method_option("free_replays"))
    on_overfit: str | None = variable(None, role="treatment", option=True)
    distill: DistillConfig | None = variable(None, role="treatment", id_at_default=False)
    # Randomized smoothing (`train.smoothing`): noise level and smoothadv's noise samples m.
    sigma: float | None = variable(None, role="treatment", option=True, id_at_default=False,
                                   column="source_sigma", label="σ",
                                   **method_option("sigma"))
    noise_samples: int | None = variable(None, role="treatment", option=True,
                                         id_at_default=False, **method_option("noise_samples"))
    attack_mode: str | None = variable(None, role="treatment", option=True,
                                       id_at_default=False, omit=_eval_at_eval_default)
    trades_attack: str | None = variable(None, role="treatment", option=True,
                                         id_at_default=False, **method_option("trades_attack"))
    # A backdoor planted while training (data poisoning, see `data.poison`, or NeuBA's
    # objective); None: clean. Measured after every fine-tuning epoch: per-run path.
    backdoor: BackdoorConfig | None = variable(None, role="treatment", engines=(),
                                               id_at_default=False)

    def __post_init__(self) -> None:
        check_task(self.task)
        check_choice("arch", self.arch, ARCHS)
        make_threat(self.norm, self.eps)  # validates norm and eps
        if self.attack_steps < 1:
            raise UserError(f"attack steps must be >= 1, got {self.attack_steps}")
        self._check_method()
        if isinstance(self.backdoor, dict):  # from YAML / a checkpoint's recipe
            object.__setattr__(self, "backdoor", BackdoorConfig.from_dict(self.backdoor))
        if self.backdoor is not None:
            self.backdoor.check(load_task(self.task).num_classes)

    def _check_method(self) -> None:
        method = self.method or ("natural" if self.eps == 0 else "pgd")
        plugin = TRAINING_METHODS.get(method)
        if not plugin.robust and self.eps != 0:
            raise UserError(f"method {method!r} takes eps 0, got eps {self.eps:g}; give a "
                            f"robust method ({', '.join(ROBUST_METHODS)}) or eps 0")
        if plugin.robust and self.eps == 0:
            raise UserError(f"method {method!r} needs eps > 0; eps 0 is natural training")
        # gaussian has no threat model: one norm, so that one sigma is one source
        if plugin.noise and self.norm != "l2":
            raise UserError(f"method {method!r} works in the L2 norm (the smoothing "
                            f"certificate's); got norm {self.norm!r}")
        for name, (owners, default) in method_options(SourceConfig).items():
            value = getattr(self, name)
            if value is not None and method not in owners:
                names = " and ".join(repr(o) for o in owners)
                raise UserError(f"{name} applies to method {names} only, not {method!r}")
            if method in owners and value is None:
                object.__setattr__(self, name, default)
        options = self.plugin_options(method)  # the plugin checks types and ranges
        if plugin.noise:  # sigma as a float, as recipes have always recorded it
            object.__setattr__(self, "sigma", options.sigma)
        self._check_attack_mode(method)
        action = self.on_overfit or plugin.on_overfit
        check_choice("on-overfit", action, ACTIONS)
        if not plugin.robust and action != "off":
            raise UserError(f"on-overfit watches adversarial training; {method} training has "
                            "nothing to watch (use 'off')")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "on_overfit", action)

    def plugin_options(self, method: str | None = None):
        """The typed options of the training method (`TRAINING_METHODS`) from this recipe."""
        method = method or self.method
        return TRAINING_METHODS.options(method, {
            f.name: getattr(self, f.name) for f in fields(TRAINING_METHODS.get(method).Options)})

    def _check_attack_mode(self, method: str) -> None:
        """Resolve `attack_mode` to the method's reference default; refuse it where no
        examples are made (natural, KD, defensive distillation) and eval for free AT."""
        distill = getattr(self.distill, "method", None)
        reference = (DISTILL_OBJECTIVES.get(distill) if distill else
                     TRAINING_METHODS.get(method)).attack_mode
        if reference is None:
            if self.attack_mode is not None:
                what = f"{distill} distillation" if distill else f"method {method!r}"
                raise UserError(f"attack mode applies to methods that make adversarial "
                                f"examples, not {what}")
            return
        mode = self.attack_mode or reference
        check_choice("attack mode", mode, ATTACK_MODES)
        if method == "free" and not distill and mode != "train":
            raise UserError("free AT takes its examples' gradient from the training pass "
                            "itself, in train mode; attack mode 'eval' does not apply")
        object.__setattr__(self, "attack_mode", mode)

    @property
    def sweeps(self) -> int:
        """Epochs the loop runs: free AT sweeps the data ceil(epochs / m) times (m passes each)."""
        return math.ceil(self.train.epochs / (self.free_replays or 1))

    def to_dict(self) -> dict:
        """The recipe as plain data, less the fields declared out of the content id at their
        default (`variables.omit_defaults`), so that the ids of the sources whose training did
        not change stay what they were before the fields existed."""
        d = asdict(self)
        if self.distill is not None:
            d["distill"] = self.distill.to_dict()
        return omit_defaults(self, d)


def method_objective(cfg: SourceConfig):
    """The training objective of `cfg`'s method and options (not distilled)."""
    return make_objective(cfg.method, cfg.eps, cfg.norm, cfg.attack_steps, cfg.attack_alpha,
                          cfg.train.seed, cfg.attack_mode,
                          **{name: getattr(cfg, name) for name in OPTION_NAMES})


def evaluate_source(model: BlockNet, task_name: str, eps: float, norm: str,
                    sigma: float | None = None) -> dict:
    """Clean and PGD-20 robust test accuracy (robust = clean when eps is 0), through the one
    evaluation path (`attacks.evaluate`); with `sigma`, also `noise_accuracy`: the clean
    accuracy under N(0, sigma^2 I) noise (one seeded draw per test image)."""
    test = load_task(task_name).test
    noisy = {} if sigma is None else {
        "noise_accuracy": noisy_accuracy(model, test.x, test.y, sigma, seed=0)}
    if eps == 0:
        clean = accuracy(model, test.x, test.y)
        return {"clean_accuracy": clean, "robust_accuracy": clean, **noisy}

    def pgd(m, e):
        return PGD(m, e, steps=EVAL_STEPS, norm=norm, seed=0)

    pgd.__name__ = f"pgd-{EVAL_STEPS}"
    table = evaluate(model, test.x, test.y, [pgd], [eps], norm, check=False)
    worst = table[table["attack"] == "worst case"].iloc[0]
    return {"clean_accuracy": float(worst.clean_accuracy),
            "robust_accuracy": float(worst.robust_accuracy), **noisy}


def build_source_model(cfg: SourceConfig, device: torch.device | str = "cpu") -> BlockNet:
    """The untrained model of recipe `cfg` (its task's classes, channels and size, its seed)."""
    task = load_task(cfg.task)
    channels = task.input_shape[0]
    spec = ModelSpec(cfg.arch, task.num_classes, channels, (0.5,) * channels, (0.5,) * channels,
                     input_size=task.input_shape[-1])
    return build_model(spec, seed=cfg.train.seed).to(device)


def source_card(cfg: SourceConfig, metrics: dict, device: torch.device | str,
                amp: bool | None) -> SourceCard:
    """The card every trained source carries: role, recipe, threat model, method, seed,
    task, `metrics`, thread count and whether bf16 autocast was on."""
    # CPU float sums differ with the number of intra-op threads, so the same recipe and seed
    # give bit-identical weights only at the same thread count: record it.
    return SourceCard(role="source", recipe=cfg.to_dict(), eps=cfg.eps, norm=cfg.norm,
                      method=cfg.method, seed=cfg.train.seed, task=cfg.task, metrics=metrics,
                      torch_threads=torch.get_num_threads(),
                      amp=amp_enabled(torch.device(device), amp))


def train_source(
    cfg: SourceConfig,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int], None] | None = None,
    teacher: torch.nn.Module | None = None,
    amp: bool | None = None,
) -> tuple[BlockNet, SourceCard]:
    """Train the source model `cfg` describes; return (model, the card for its checkpoint).

    A distilled source (`cfg.distill`) needs its trained `teacher`; its robust accuracy is
    measured at the teacher's eps/norm when its own eps is 0. `amp`: bf16 autocast in
    training (None: on CUDA only; recorded in the metadata).
    """
    task = load_task(cfg.task)
    model = build_source_model(cfg, device)
    eval_eps, eval_norm = cfg.eps, cfg.norm
    if cfg.distill is not None:
        if teacher is None:
            raise UserError("a distilled source needs its teacher model")
        objective = distill_objective(cfg.distill, teacher, cfg.eps, cfg.norm, cfg.attack_steps,
                                      cfg.attack_alpha, cfg.train.seed, cfg.attack_mode)
        if cfg.eps == 0:
            eval_eps = float(cfg.distill.teacher.get("eps", 0.0))
            eval_norm = str(cfg.distill.teacher.get("norm", cfg.norm))
    else:
        objective = method_objective(cfg)
    train, backdoor = task.train, {}
    if cfg.backdoor is not None:
        attack = cfg.backdoor.attack_plugin()  # plants it: poisoned data and/or a loss term
        train, index = attack.poison(task.train, task.num_classes)
        objective = plant_objective(attack, objective, task.input_shape, model.feature_dim)
        backdoor = {"poisoned_count": len(index)}
        if len(index):  # (a poisoning attack poisons at least one image)
            backdoor["poisoned_indices"] = index.tolist()
    monitor = None
    if cfg.on_overfit != "off":  # the watched batch is held out of training
        train, held = hold_out(train, cfg.train.seed)
        monitor = OverfitMonitor(held.x.to(device), held.y.to(device), cfg.eps, cfg.norm,
                                 cfg.on_overfit, seed=cfg.train.seed)
    callback = None if on_epoch is None else (lambda _m, epoch: on_epoch(epoch) or {})
    history = fit(model, train, cfg.train, objective, callback, monitor, amp=amp)
    metrics = evaluate_source(model, cfg.task, eval_eps, eval_norm, cfg.sigma)
    metrics["final_train_loss"] = history[-1]["train_loss"]
    metrics["epoch_seconds"] = [r["epoch_seconds"] for r in history]
    metrics["train_seconds"] = sum(metrics["epoch_seconds"])
    metrics["history"] = history
    if monitor is not None:
        metrics["overfit"] = monitor.summary()
    if backdoor:
        metrics["poisoned_count"] = backdoor["poisoned_count"]
    card = source_card(cfg, metrics, device, amp)
    if cfg.distill is not None:
        card.distill = cfg.distill.to_dict()
        metrics |= {"robust_eps": eval_eps, "robust_norm": eval_norm}
    if backdoor:
        card.backdoor = {**cfg.backdoor.to_dict(), **backdoor}
    return model, card
