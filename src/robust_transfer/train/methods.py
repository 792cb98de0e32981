"""Adversarial-training methods as objectives of the one loop (`train.loop.fit`).

- `natural`: CE(x).
- `pgd`: Madry et al. 2018 (arXiv 1706.06083), CE on PGD examples (`PGDExamples`).
- `fgsm`: Goodfellow et al. 2015 (arXiv 1412.6572), a*CE(x) + (1-a)*CE(x_fgsm), a = 0.5.
- `fast`: Wong et al. 2020 (arXiv 2001.03994), CE on FGSM from a uniform random start with
  step 1.25*eps (catastrophic overfitting is watched by `train.overfit.OverfitMonitor`).
- `free`: Shafahi et al. 2019 (arXiv 1904.12843), `FreeLoss`: each minibatch replayed m times,
  one backward pass per replay giving both the weight gradient and the perturbation's.
- `trades`: Zhang et al. 2019 (arXiv 1901.08573), `TRADESLoss`: CE(x) + beta*KL(f(x)||f(x')).
- `gaussian`: Cohen et al. 2019 (arXiv 1902.02918), CE on x + N(0, sigma^2 I): training for
  randomized smoothing, not adversarial (eps 0); `train.smoothing.GaussianExamples`.
- `smoothadv`: Salman et al. 2019 (arXiv 1906.04584), SmoothAdv-PGD: PGD-L2 on the smoothed
  soft classifier's CE with m noise draws, then CE on the m noisy copies of x'
  (`train.smoothing.SmoothAdvLoss`).

Each method is a plugin (`robust_transfer.plugins`) in `TRAINING_METHODS`: a class with its
facts (robust, noise, reference attack mode, overfitting watch), its typed options and its
objective; `METHODS`, `ROBUST_METHODS`, `NOISE_METHODS` and `ATTACK_MODE` are derived from it.

Every perturbation comes from the attacks layer (its attacks and `ThreatModel`s), so every
example a method trains on lies in the threat model's ball and in [0,1].

Each method's defaults follow its reference code, including the model's mode while its
examples are made (`ATTACK_MODE`; `Attack.set_mode`): eval for PGD (MadryLab robustness) and
TRADES (its code calls `model.eval()` around the attack); train for fast (Wong et al.), free
(Shafahi et al.) and FGSM (a choice: Goodfellow et al. define x_fgsm by the gradient of the
training loss J(theta, x, y) itself, i.e. of the network as it is being trained, dropout
included in their maxout nets). In train mode BatchNorm normalises with the batch's
statistics and the attack's forward passes update its running statistics too, as in those
codes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, get_type_hints

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.attacks import FGSM, KLPGD, L1Threat, make_threat
from robust_transfer.attacks.kl import STARTS
from robust_transfer.data.augment import check_sigma
from robust_transfer.errors import UserError, check_choice
from robust_transfer.plugins import NoOptions, Registry, option
from robust_transfer.train.examples import PGDExamples
from robust_transfer.train.objectives import ExampleLoss, Objective, natural_loss
from robust_transfer.train.smoothing import (
    SIGMA,
    SMOOTHADV_SAMPLES,
    GaussianExamples,
    SmoothAdvLoss,
)

FGSM_CLEAN_WEIGHT = 0.5  # Goodfellow et al.'s a
FAST_STEP = 1.25  # Wong et al.'s FGSM-RS step, as a multiple of eps
TRADES_BETA = 6.0  # Zhang et al.'s default for CIFAR-10
FREE_REPLAYS = 8  # Shafahi et al.'s m for CIFAR-10
# TRADES' inner maximisation: "reference" = its code (x + 0.001 N(0, I), step 0.007 at
# eps 8/255 for Linf, scaled with eps; its L2 branch's 2 * eps / K for L2 and L1), "uniform" =
# a uniform start in the ball and PGD's step 2.5 * eps / K (this package's choice before).
TRADES_ATTACKS = ("reference", "uniform")
TRADES_LINF_STEP = 0.007 / (8 / 255)  # TRADES' step as a multiple of eps (CIFAR-10: 0.2625)


def trades_alpha(eps: float, norm: str, steps: int, attack: str) -> float:
    """TRADES' attack step for `attack` (one of `TRADES_ATTACKS`) at (norm, eps), K steps."""
    if attack == "uniform":
        return 2.5 * eps / steps
    return TRADES_LINF_STEP * eps if norm == "linf" else 2 * eps / steps


class FGSMLoss:
    """Goodfellow et al. 2015's FGSM adversarial training: a*CE(x) + (1-a)*CE(x_fgsm).

    x_fgsm is one step of size eps from x itself (`attacks.FGSM`, no random start), made in
    `mode` ("train" by default: the gradient of the training loss, see the module docstring).

    Shape: x (N, C, H, W) in [0,1], y (N,) -> scalar loss.

    Example:
        loss = FGSMLoss(eps=0.1, norm="linf")(model, x, y)
    """

    def __init__(self, eps: float, norm: str, clean_weight: float = FGSM_CLEAN_WEIGHT,
                 mode: str = "train") -> None:
        self.eps, self.norm, self.clean_weight, self.mode = eps, norm, clean_weight, mode

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = FGSM(model, self.eps, self.norm).set_mode(self.mode)(x, y)
        a = self.clean_weight
        return a * F.cross_entropy(model(x), y) + (1 - a) * F.cross_entropy(model(x_adv), y)


class FreeLoss:
    """Free adversarial training (Shafahi et al. 2019, "Adversarial Training for Free!").

    The loop replays each minibatch `replays` (m) times (it honours `replays`). Each replay is
    one forward and one backward pass at clip(x + delta, 0, 1); that backward pass gives the
    weight gradient (the loop's optimiser step) and the gradient with respect to delta, with
    which delta takes one ascent step of size eps (`ThreatModel.step`) and is projected into
    the eps-ball only (`project_delta`). As in Shafahi et al.'s code (free_train.py): delta is
    clipped to [-eps, eps] but not to the image box; the input is clamped to [0,1] in the
    forward pass, so the gradient reaching delta is zero on saturated pixels and their noise
    stays put. delta is warm: kept across replays and carried on to the next minibatch (and
    epoch), starting at zero. The step is applied lazily, at the next call, once the loop's
    backward has filled delta's gradient. The forward pass is the training one (train mode).

    Cost: a replay costs what one natural step costs. With `TrainConfig.epochs` = E, the loop
    sweeps the data ceil(E/m) times, each minibatch m times in a row, so E counts passes over
    the data (m per sweep) and the number of forward-backward passes is that of E natural
    epochs (exactly when m divides E).

    Shape: x (N, C, H, W) in [0,1], y (N,) -> scalar loss.

    Example:
        fit(model, data, TrainConfig(epochs=8), FreeLoss(eps=0.1, norm="linf", replays=4))
    """

    def __init__(self, eps: float, norm: str, replays: int = FREE_REPLAYS) -> None:
        self.threat = make_threat(norm, eps)
        self.replays = int(replays)
        self.delta: torch.Tensor | None = None  # (batch, C, H, W), the warm perturbation
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (delta leaf, x)

    def _ascend(self) -> None:
        """delta <- project_delta(delta + eps * step direction), from the last backward pass."""
        if self._last is None or self._last[0].grad is None:
            return
        delta, x = self._last
        if isinstance(self.threat, L1Threat):  # its sparse step skips coordinates the box stops
            point = (x + delta.detach()).clamp(0, 1)
            moved = delta.detach() + (self.threat.step(point, delta.grad, self.threat.eps) - point)
        else:  # additive steps: on delta itself, as the reference code
            moved = self.threat.step(delta.detach(), delta.grad, self.threat.eps)
        self.delta[: len(x)] = self.threat.project_delta(moved)
        self._last = None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._ascend()
        if self.delta is None or len(self.delta) < len(x) or self.delta.shape[1:] != x.shape[1:]:
            grown = torch.zeros_like(x)
            if self.delta is not None and self.delta.shape[1:] == x.shape[1:]:
                grown[: len(self.delta)] = self.delta
            self.delta = grown
        # A smaller (last) batch takes the first rows; delta carries on to the next batch.
        delta = self.delta[: len(x)].clone().requires_grad_(True)
        self._last = (delta, x)
        return F.cross_entropy(model((x + delta).clamp(0, 1)), y)


class TRADESLoss:
    """TRADES (Zhang et al. 2019, arXiv 1901.08573): CE(f(x), y) + beta * KL(f(x) || f(x')).

    x' maximises the KL within the threat model (`attacks.KLPGD`, `steps` PGD steps of size
    `alpha`). `attack="reference"` (default) follows TRADES' code (trades.py): start at
    x + 0.001 N(0, I), step 0.007 at eps 8/255 scaled with eps (Linf; its L2 branch 2*eps/K),
    10 steps there (`steps` here is the recipe's); `attack="uniform"`: a uniform start in the
    ball, step 2.5*eps/K. `alpha` given overrides the step. The attack runs in `mode` (eval,
    as TRADES' code); both forward passes of the loss run in train mode and the gradient
    flows through both (TRADES' Alg. 1). KL is summed over classes and averaged over the
    batch ("batchmean", the code's sum / batch size). beta = 0 is natural training: the KL
    term and its attack are skipped, so the weights (and BatchNorm statistics) are exactly
    those of natural training with the same seed.

    Shape: x (N, C, H, W) in [0,1], y (N,) -> scalar loss.

    Example:
        loss = TRADESLoss(eps=0.1, norm="linf", beta=6.0)(model, x, y)
    """

    def __init__(self, eps: float, norm: str, beta: float = TRADES_BETA, steps: int = 7,
                 alpha: float | None = None, seed: int = 0, attack: str = "reference",
                 mode: str = "eval") -> None:
        check_choice("TRADES attack", attack, TRADES_ATTACKS)
        self.eps, self.norm, self.beta, self.steps = eps, norm, beta, steps
        self.alpha = trades_alpha(eps, norm, steps, attack) if alpha is None else alpha
        self.start = STARTS[TRADES_ATTACKS.index(attack)]  # reference: normal, else uniform
        self.seed, self.mode = seed, mode
        self.calls = 0

    def adversarial(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x' for this call (fresh random starts each call, as `PGDExamples`)."""
        seed = self.seed * 2**32 + self.calls
        self.calls += 1
        unused_labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
        attack = KLPGD(model, self.eps, self.alpha, self.steps, self.norm, seed=seed,
                       start=self.start)
        return attack.set_mode(self.mode)(x, unused_labels)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.beta == 0:
            return F.cross_entropy(model(x), y)
        x_adv = self.adversarial(model, x)
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.log_softmax(logits, dim=1),
                      reduction="batchmean", log_target=True)
        return F.cross_entropy(logits, y) + self.beta * kl


# ---- the methods as plugins (`robust_transfer.plugins`) ------------------------------------

TRAINING_METHODS: Registry[TrainingMethod] = Registry("training method")


class TrainingMethod:
    """A training method: its facts, its typed options and its objective.

    Facts (class attributes): `robust` (has an adversary: needs eps > 0; else takes eps 0),
    `noise` (trains on Gaussian noise of level `sigma`, L2 only: randomized smoothing),
    `attack_mode` (the model's mode while its examples are made in its reference code; None:
    no separate attack), `on_overfit` (the default catastrophic-overfitting watch). Its
    `Options` fields are named as `train.SourceConfig`'s fields that carry them (the grid's
    declaration of each, `variables.variable(methods=...)`, takes owner and default from here).
    """

    name: ClassVar[str]
    robust: ClassVar[bool] = True
    noise: ClassVar[bool] = False
    attack_mode: ClassVar[str | None] = None
    on_overfit: ClassVar[str] = "off"
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = self.Options() if options is None else options

    def objective(self, eps: float, norm: str, steps: int, alpha: float | None, seed: int,
                  mode: str) -> Objective:
        """The loss at threat model (norm, eps): `steps`/`alpha` the PGD settings, `mode` the
        model's mode while examples are made."""
        raise NotImplementedError


@TRAINING_METHODS.register
class Natural(TrainingMethod):
    """Cross-entropy on the clean inputs."""

    name, robust = "natural", False

    def objective(self, eps, norm, steps, alpha, seed, mode) -> Objective:
        return natural_loss


@TRAINING_METHODS.register
class PGDTraining(TrainingMethod):
    """Madry et al. 2018: cross-entropy on PGD examples."""

    name, attack_mode = "pgd", "eval"

    def objective(self, eps, norm, steps, alpha, seed, mode) -> Objective:
        return ExampleLoss(PGDExamples(eps, norm, steps, alpha, seed, mode=mode))


@TRAINING_METHODS.register
class FGSMTraining(TrainingMethod):
    """Goodfellow et al. 2015: a*CE(x) + (1-a)*CE(x_fgsm) (`FGSMLoss`)."""

    name, attack_mode = "fgsm", "train"

    def objective(self, eps, norm, steps, alpha, seed, mode) -> Objective:
        return FGSMLoss(eps, norm, mode=mode)


@TRAINING_METHODS.register
class FastTraining(TrainingMethod):
    """Wong et al. 2020: FGSM from a uniform random start, step 1.25*eps (watched for
    catastrophic overfitting by default)."""

    name, attack_mode, on_overfit = "fast", "train", "warn"

    def objective(self, eps, norm, steps, alpha, seed, mode) -> Objective:
        return ExampleLoss(PGDExamples(eps, norm, 1, FAST_STEP * eps, seed, mode=mode))


def _at_least_one(value: int, what: str) -> None:
    if value < 1:
        raise UserError(f"{what} must be an integer >= 1, got {value}")


@TRAINING_METHODS.register
class FreeTraining(TrainingMethod):
    """Shafahi et al. 2019: each minibatch replayed m times (`FreeLoss`); its examples come
    from the training pass itself, in train mode."""

    name, attack_mode = "free", "train"

    @dataclass(frozen=True)
    class Options:
        free_replays: int = option(FREE_REPLAYS, "replays m of each minibatch; epochs count "
                                   "passes")

        def __post_init__(self) -> None:
            _at_least_one(self.free_replays, "free replays")

    def objective(self, eps, norm, steps, alpha, seed, mode) -> Objective:
        return FreeLoss(eps, norm, self.options.free_replays)


@TRAINING_METHODS.register
class TRADESTraining(TrainingMethod):
    """Zhang et al. 2019: CE(x) + beta*KL(f(x)||f(x')) (`TRADESLoss`)."""

    name, attack_mode = "trades", "eval"

    @dataclass(frozen=True)
    class Options:
        trades_beta: float = option(TRADES_BETA, "weight of the KL term")
        trades_attack: str = option(TRADES_ATTACKS[0], "inner attack: reference (its code: "
                                    "x + 0.001 N(0,1) start, step 0.007 at eps 8/255 scaled "
                                    "with eps, L2 2 eps/K) | uniform (uniform start in the "
                                    "ball, step 2.5 eps/K)")

        def __post_init__(self) -> None:
            check_choice("trades attack", self.trades_attack, TRADES_ATTACKS)
            if not 0 <= self.trades_beta < float("inf"):
                raise UserError(f"trades beta must be >= 0 and finite, got {self.trades_beta}")

    def objective(self, eps, norm, steps, alpha, seed, mode) -> Objective:
        o = self.options
        return TRADESLoss(eps, norm, o.trades_beta, steps, alpha, seed, o.trades_attack, mode)


@TRAINING_METHODS.register
class GaussianTraining(TrainingMethod):
    """Cohen et al. 2019: cross-entropy on x + N(0, sigma^2 I), for randomized smoothing."""

    name, robust, noise = "gaussian", False, True

    @dataclass(frozen=True)
    class Options:
        sigma: float = option(SIGMA, "std of the Gaussian noise added to [0,1] images")

        def __post_init__(self) -> None:
            check_sigma(self.sigma)

    def objective(self, eps, norm, steps, alpha, seed, mode) -> Objective:
        return ExampleLoss(GaussianExamples(self.options.sigma, seed))


@TRAINING_METHODS.register
class SmoothAdvTraining(TrainingMethod):
    """Salman et al. 2019: SmoothAdv-PGD on the smoothed classifier (`SmoothAdvLoss`), L2."""

    name, noise = "smoothadv", True

    @dataclass(frozen=True)
    class Options:
        sigma: float = option(SIGMA, "std of the Gaussian noise added to [0,1] images")
        noise_samples: int = option(SMOOTHADV_SAMPLES, "noise draws m per image in the "
                                    "attack and the loss")

        def __post_init__(self) -> None:
            check_sigma(self.sigma)
            _at_least_one(self.noise_samples, "noise samples")

    def objective(self, eps, norm, steps, alpha, seed, mode) -> Objective:
        o = self.options
        return SmoothAdvLoss(eps, o.sigma, steps, alpha, o.noise_samples, seed)


# The methods' facts as tables, derived from the registry.
METHODS = TRAINING_METHODS.names()
ROBUST_METHODS = tuple(m for m in METHODS if TRAINING_METHODS.get(m).robust)
NOISE_METHODS = tuple(m for m in METHODS if TRAINING_METHODS.get(m).noise)
ATTACK_MODE = {m: TRAINING_METHODS.get(m).attack_mode for m in METHODS
               if TRAINING_METHODS.get(m).attack_mode}
OPTION_NAMES = tuple(dict.fromkeys(f.name for m in METHODS
                                   for f in fields(TRAINING_METHODS.get(m).Options)))


def option_declaration(name: str) -> tuple[tuple[str, ...], Any, Any]:
    """(the methods that take option `name`, its `Options` field, its type), from the first
    method that declares it."""
    owners = tuple(m for m in METHODS
                   if name in {f.name for f in fields(TRAINING_METHODS.get(m).Options)})
    options = TRAINING_METHODS.get(owners[0]).Options
    field = next(f for f in fields(options) if f.name == name)
    return owners, field, get_type_hints(options)[name]


def method_option(name: str) -> dict:
    """The methods that take option `name` and its default there, as
    `variables.variable(methods=..., method_default=...)` keywords."""
    owners, field, _ = option_declaration(name)
    return {"methods": owners, "method_default": field.default}


def make_objective(method: str, eps: float, norm: str, steps: int = 7,
                   alpha: float | None = None, seed: int = 0, attack_mode: str | None = None,
                   **options: Any) -> Objective:
    """The objective of `method` (`TRAINING_METHODS`) at threat model (norm, eps). `steps`
    and `alpha` are the PGD settings of `pgd`, `trades` and `smoothadv`; `attack_mode` the
    model's mode while examples are made (None: the method's reference, `ATTACK_MODE`).
    `options`: method options by name (`OPTION_NAMES`: trades_beta, trades_attack,
    free_replays, sigma, noise_samples); each method takes its own, None is its default."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise UserError(f"unknown training method option(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(OPTION_NAMES)}")
    cls = TRAINING_METHODS.get(method)
    takes = {f.name for f in fields(cls.Options)}
    method_opts = TRAINING_METHODS.options(method, {k: v for k, v in options.items()
                                                    if k in takes and v is not None})
    mode = attack_mode or cls.attack_mode or "eval"
    return cls(method_opts).objective(eps, norm, steps, alpha, seed, mode)
