"""Distillation objectives: knowledge distillation, defensive distillation, ARD.

- `kd_loss` / `KDLoss`: Hinton et al. 2015 (arXiv 1503.02531), the student matches the
  teacher's softened outputs.
- `TemperatureLoss` + `SoftLabelLoss`: defensive distillation (Papernot et al. 2016,
  arXiv 1511.04508): a teacher trained at temperature T, a student trained on its soft labels
  at T, the student deployed at T = 1 (the saved model returns plain logits).
- `ARDLoss`: adversarially robust distillation (Goldblum et al. 2020, arXiv 1905.09747): the
  KD term on the student's adversarial examples against the teacher's clean soft labels,
  the examples made in train mode as in the ARD code (`ARD_ATTACK_MODE`).

The teacher is always run in eval mode without gradients: it is a fixed target, and its
BatchNorm statistics must not drift with the student's batches.

Each objective is a plugin (`robust_transfer.plugins`) in `DISTILL_OBJECTIVES`: a class with
its facts (whether it attacks the student, the model's mode while it does in its reference
code), its typed options (temperature, alpha, ARD's KL scaling) and its objective.
`DistillConfig` is the recorded treatment (its fields enter run ids); `distill_objective`
builds the objective it names through the registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import eval_mode, predict_logits
from robust_transfer.plugins import Registry, option
from robust_transfer.train.examples import ExampleMaker, PGDExamples
from robust_transfer.train.objectives import Objective

DEFENSIVE_TEMPERATURE = 100.0
KD_TEMPERATURE, KD_ALPHA = 4.0, 0.9
# ARD's KL: "paper" = summed over classes, mean over examples (the paper's KL per example);
# "code" = the ARD code's nn.KLDivLoss() ('mean'), which also divides by the K classes.
KL_SCALINGS = ("paper", "code")


def check_distill_settings(temperature: float, alpha: float) -> None:
    """`UserError` unless temperature > 0 and 0 <= alpha <= 1 (checked before any work)."""
    if not temperature > 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise UserError(f"alpha must be in [0, 1], got {alpha}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Hinton et al. 2015 knowledge-distillation loss of a batch (a scalar).

        L = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

    **alpha weights the distillation (KL) term**; 1 - alpha weights the hard-label
    cross-entropy. alpha = 0 is plain training on labels, alpha = 1 is pure distillation.
    Libraries disagree on this (some weight the CE term by alpha), so check before porting
    settings. The KL is summed over classes and averaged over examples (PyTorch's
    "batchmean"; its "mean" would also divide by the number of classes, a recurring bug).
    T^2 keeps the soft term's gradients on the scale of the hard term's as T changes.

    Shape: student_logits, teacher_logits (N, K); y (N,) -> scalar.

    Example:
        loss = kd_loss(student(x), teacher(x).detach(), y, temperature=4, alpha=0.9)
    """
    check_distill_settings(temperature, alpha)
    soft_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    soft_student = F.log_softmax(student_logits / temperature, dim=1)
    kl = F.kl_div(soft_student, soft_teacher, reduction="batchmean", log_target=True)
    loss = alpha * temperature**2 * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, y)
    return loss


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits on x, in eval mode (every module's own flag restored), no grad."""
    with eval_mode(teacher):
        return teacher(x)


class KDLoss:
    """Objective: `kd_loss` between the student on `make_examples(x)` (default: x itself)
    and the teacher on clean x."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9,
                 make_examples: ExampleMaker | None = None) -> None:
        check_distill_settings(temperature, alpha)
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
        self.make_examples = make_examples

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = teacher_logits(self.teacher, x)
        inputs = x if self.make_examples is None else self.make_examples(model, x, y)
        return kd_loss(model(inputs), t, y, self.temperature, self.alpha)


class ARDLoss:
    """Objective of adversarially robust distillation (Goldblum et al. 2020):

        L = alpha * T^2 * KL(softmax(t(x) / T) || softmax(s(x') / T)) + (1 - alpha) * CE(s(x), y)

    x' = PGD on the student's cross-entropy (the attacks layer's PGD, via `PGDExamples`; its
    `mode` train by default, as the ARD code), the teacher's soft labels from clean x, the
    hard-label term on clean x as in the paper. The KL is the paper's: summed over classes,
    averaged over examples (factor 1 / N). `kl_scaling="code"` takes the ARD code's
    `nn.KLDivLoss()` ('mean', factor 1 / (N K)): the KL term K times smaller, as if alpha were
    shrunk (for 10 classes, alpha 0.9 acts like about 0.47 relative to the CE term).
    """

    def __init__(self, teacher: nn.Module, examples: PGDExamples, temperature: float = 4.0,
                 alpha: float = 0.9, kl_scaling: str = "paper") -> None:
        check_distill_settings(temperature, alpha)
        check_choice("ARD KL scaling", kl_scaling, KL_SCALINGS)
        self.teacher, self.examples = teacher, examples
        self.temperature, self.alpha, self.kl_scaling = temperature, alpha, kl_scaling

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = teacher_logits(self.teacher, x)
        x_adv = self.examples(model, x, y)
        kl = kd_loss(model(x_adv), t, y, self.temperature, alpha=1.0)
        if self.kl_scaling == "code":
            kl = kl / t.shape[1]
        loss = self.alpha * kl
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * F.cross_entropy(model(x), y)
        return loss


class TemperatureLoss:
    """Objective of a defensive-distillation teacher: CE(softmax(logits / T), y).

    The model itself still returns plain logits; only its training loss divides them by T, so
    it learns logits about T times larger than natural training would (Papernot et al. 2016).
    """

    def __init__(self, temperature: float = DEFENSIVE_TEMPERATURE) -> None:
        check_distill_settings(temperature, 1.0)
        self.temperature = temperature

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x) / self.temperature, y)


class SoftLabelLoss:
    """Objective of a defensive-distillation student: cross-entropy of softmax(s / T) against
    the teacher's soft labels softmax(t / T), both at temperature T (Papernot et al. 2016).

    No hard labels and no Hinton T^2 factor (at T = 100 it would scale the gradients 100x);
    up to the teacher's entropy (a constant) this is kd_loss(alpha=1) / T^2.
    """

    def __init__(self, teacher: nn.Module, temperature: float = DEFENSIVE_TEMPERATURE) -> None:
        check_distill_settings(temperature, 1.0)
        self.teacher, self.temperature = teacher, temperature

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        soft = F.softmax(teacher_logits(self.teacher, x) / self.temperature, dim=1)
        return F.cross_entropy(model(x) / self.temperature, soft)


# ---- the objectives as plugins (`robust_transfer.plugins`) ---------------------------------

DISTILL_OBJECTIVES: Registry[DistillObjective] = Registry("distillation objective")


class DistillObjective:
    """A distillation objective: its facts, its typed options and its objective.

    Facts: `adversarial` (trains on the student's adversarial examples: needs eps > 0),
    `attack_mode` (the student's mode while they are made in the reference code; None: no
    examples made). `Options` fields are named as `DistillConfig`'s fields that carry them.
    """

    name: ClassVar[str]
    adversarial: ClassVar[bool] = False
    attack_mode: ClassVar[str | None] = None

    @dataclass(frozen=True)
    class Options:
        temperature: float = option(KD_TEMPERATURE, "softmax temperature T, > 0")
        alpha: float = option(KD_ALPHA, "weight of the distillation (KL) term, in [0, 1]; "
                              "1 - alpha weights cross-entropy on the labels")

        def __post_init__(self) -> None:
            check_distill_settings(self.temperature, self.alpha)

    def __init__(self, options: Any = None) -> None:
        self.options = self.Options() if options is None else options

    def objective(self, teacher: nn.Module, eps: float, norm: str, steps: int,
                  alpha: float | None, seed: int, mode: str | None) -> Objective:
        """The loss against `teacher`; (eps, norm, steps, alpha, seed, mode) set up the
        student's adversarial examples where the objective makes them."""
        raise NotImplementedError


@DISTILL_OBJECTIVES.register
class KnowledgeDistillation(DistillObjective):
    """Hinton et al. 2015: the student matches the teacher's softened outputs (`KDLoss`)."""

    name = "kd"

    def objective(self, teacher, eps, norm, steps, alpha, seed, mode) -> Objective:
        return KDLoss(teacher, self.options.temperature, self.options.alpha)


@DISTILL_OBJECTIVES.register
class AdversariallyRobustDistillation(DistillObjective):
    """Goldblum et al. 2020: the KD term on the student's PGD examples (`ARDLoss`)."""

    name, adversarial = "ard", True
    attack_mode = "train"  # Goldblum et al.'s code attacks the student after net.train()

    @dataclass(frozen=True)
    class Options(DistillObjective.Options):
        kl_scaling: str = option(KL_SCALINGS[0], "paper (KL summed over classes, mean over "
                                 "examples) | code (the ARD code's KLDivLoss 'mean': also / K)")

        def __post_init__(self) -> None:
            super().__post_init__()
            check_choice("ARD KL scaling", self.kl_scaling, KL_SCALINGS)

    def objective(self, teacher, eps, norm, steps, alpha, seed, mode) -> Objective:
        if eps <= 0:
            raise UserError("adversarial distillation (ARD) needs eps > 0")
        examples = PGDExamples(eps, norm, steps, alpha, seed, mode=mode or self.attack_mode)
        o = self.options
        return ARDLoss(teacher, examples, o.temperature, o.alpha, o.kl_scaling)


@DISTILL_OBJECTIVES.register
class DefensiveDistillation(DistillObjective):
    """Papernot et al. 2016: the student on the teacher's soft labels at T (`SoftLabelLoss`);
    no hard labels, so no alpha."""

    name = "defensive"

    @dataclass(frozen=True)
    class Options:
        temperature: float = option(DEFENSIVE_TEMPERATURE, "softmax temperature T, > 0")

        def __post_init__(self) -> None:
            check_distill_settings(self.temperature, 1.0)

    def objective(self, teacher, eps, norm, steps, alpha, seed, mode) -> Objective:
        return SoftLabelLoss(teacher, self.options.temperature)


METHODS = DISTILL_OBJECTIVES.names()
ARD_ATTACK_MODE = DISTILL_OBJECTIVES.get("ard").attack_mode


@dataclass(frozen=True)
class DistillConfig:
    """How a source is distilled (its treatment): method, temperature, alpha and the teacher.

    `method`: a `DISTILL_OBJECTIVES` name: "kd" (Hinton), "ard" (Goldblum; adversarial
    examples under the source's own eps/norm) or "defensive" (Papernot; soft labels at T,
    alpha unused). `teacher` identifies the teacher: its recipe as a dict (a grid source), or
    its checkpoint path and recipe. `kl_scaling`: ARD only (`KL_SCALINGS`).
    """

    method: str = "kd"
    temperature: float = KD_TEMPERATURE
    alpha: float = KD_ALPHA
    teacher: dict = field(default_factory=dict)
    kl_scaling: str = "paper"  # ARD only: `KL_SCALINGS`

    def __post_init__(self) -> None:
        check_distill_settings(self.temperature, self.alpha)
        takes = {f.name for f in fields(DISTILL_OBJECTIVES.get(self.method).Options)}
        if self.kl_scaling != "paper" and "kl_scaling" not in takes:
            raise UserError(f"the KL scaling option applies to ARD only, not {self.method!r}")
        self.plugin_options()  # the objective's own checks (kl_scaling's choices)

    def plugin_options(self) -> Any:
        """The typed options of the objective (`DISTILL_OBJECTIVES`) from this config."""
        cls = DISTILL_OBJECTIVES.get(self.method)
        return DISTILL_OBJECTIVES.options(self.method, {
            f.name: getattr(self, f.name) for f in fields(cls.Options)})

    def to_dict(self) -> dict:
        """As plain data; `kl_scaling` only when not the paper's (the ids of recipes from
        before the option stay what they were)."""
        d = asdict(self)
        if d["kl_scaling"] == "paper":
            del d["kl_scaling"]
        return d

    def label(self) -> str:
        """Short readable text, e.g. "ARD T=4 α=0.9" (results column, report legend)."""
        if self.method == "defensive":
            return f"defensive T={self.temperature:g}"
        return f"{self.method.upper()} T={self.temperature:g} α={self.alpha:g}"


def distill_objective(cfg: DistillConfig, teacher: nn.Module, eps: float, norm: str,
                      attack_steps: int = 7, attack_alpha: float | None = None,
                      seed: int = 0, attack_mode: str | None = None) -> Objective:
    """The training objective `cfg` names (`DISTILL_OBJECTIVES`), against `teacher` (ARD
    attacks at eps/norm, in `attack_mode`, None: the objective's reference mode)."""
    plugin = DISTILL_OBJECTIVES.get(cfg.method)(cfg.plugin_options())
    return plugin.objective(teacher, eps, norm, attack_steps, attack_alpha, seed, attack_mode)


def distill_label(d: dict | None, eps: float = 0.0, norm: str = "") -> str:
    """Readable text for a checkpoint's `distill` record ("" when not distilled), e.g.
    "ARD T=4 α=0.9 ← L2 ε=0.5": the results column `source_distill` and the report's label.
    An ARD student's own threat model (eps, norm) is named when it is not its teacher's."""
    if not d:
        return ""
    cfg = DistillConfig(d["method"], d["temperature"], d["alpha"])
    teacher = d.get("teacher") or {}
    t_eps = float(teacher.get("eps", 0.0) or 0.0)
    t_norm = str(teacher.get("norm", ""))
    source = "natural" if t_eps == 0 else f"{t_norm.upper()} ε={t_eps:g}"
    own = ""
    if cfg.method == "ard" and (eps, norm) != (t_eps, t_norm):
        own = f" at {norm.upper()} ε={eps:g}"
    return f"{cfg.label()}{own} ← {source}"


def kl_to_teacher(student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                  temperature: float = 1.0) -> float:
    """Mean over examples of KL(softmax(t/T) || softmax(s/T)) on x: how far a student is
    from its teacher."""
    t = F.log_softmax(predict_logits(teacher, x) / temperature, 1)
    s = F.log_softmax(predict_logits(student, x) / temperature, 1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True).item()
