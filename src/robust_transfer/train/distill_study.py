"""A teacher checkpoint distilled into a student, compared with the student trained alone.

`plan_distillation` checks everything (teacher, task, settings) and lists what will train, so
a caller can refuse bad input and size its progress bars before any work;
`run_distillation` trains and measures. Every robust number comes from `attacks.evaluate`.

Defensive distillation (Papernot et al. 2016) retrains the teacher at temperature T on the
teacher checkpoint's task and recipe (arch, epochs, batch size, seed), then trains the
student on its soft labels at T; both use the recipe's lr x max(1, T/5) and no weight decay:
at T the loss gradient w.r.t. the logits is T times smaller, and with the recipe's own lr
(0.1) and weight decay the logits barely grow (measured on digits-0to4, T=100, 30 epochs:
teacher 88%, student 39% clean accuracy; with lr 2.0 and no weight decay 99.6% / 99.3%).
`masking_story` then shows Carlini & Wagner's (2016) result: at T = 1 the softmax saturates,
cross-entropy gradients vanish and PGD-CE appears to fail, while the margin loss on logits
(PGD-margin, CW) breaks the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.attacks import CW, PGD, GradientMaskingWarning, evaluate
from robust_transfer.data import TASKS, check_task, load_task
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import load_checkpoint
from robust_transfer.models.nets import ARCHS
from robust_transfer.models.runtime import predict_logits
from robust_transfer.train.distill import (
    DISTILL_OBJECTIVES,
    DistillConfig,
    TemperatureLoss,
    check_distill_settings,
)
from robust_transfer.train.loop import TrainConfig, fit
from robust_transfer.train.source import SourceConfig, build_source_model, train_source

EVAL_STEPS = 20
CW_STEPS, CW_SEARCH_STEPS = 100, 5  # enough to break defensive distillation on digits
DEFAULT_EPS = {"l2": 1.0, "linf": 0.1, "l1": 4.0}  # for a natural teacher on 8x8 digits


@dataclass(frozen=True)
class DistillSettings:
    """What the user asks for. None: taken from the teacher checkpoint (task, epochs, eps,
    norm) or the method's default (temperature: 4, or 100 for defensive distillation)."""

    student: str = "cnn-small"
    temperature: float | None = None
    alpha: float = 0.9
    task: str | None = None
    epochs: int | None = None
    seed: int | None = None  # None: the teacher's seed + 1 (not a replica of the teacher)
    adversarial: bool = False
    defensive: bool = False
    eps: float | None = None
    norm: str | None = None
    attack_mode: str | None = None  # ARD's (None: the ARD code's, train)
    kl_scaling: str = "paper"  # ARD's KL: the paper's per-example mean, or the code's / K


@dataclass(frozen=True)
class DistillPlan:
    teacher_dir: str
    teacher_meta: dict
    temperature: float
    eps: float
    norm: str
    students: dict[str, SourceConfig]  # row name -> recipe, in training order
    defensive_teacher: SourceConfig | None  # the teacher retrained at T (defensive only)
    saved: str  # the row name of the student that is saved

    @property
    def stages(self) -> list[tuple[str, int]]:
        """(what trains, its epochs), in order: the progress a caller can show."""
        out = [] if self.defensive_teacher is None else [
            (f"teacher at T={self.temperature:g}", self.defensive_teacher.train.epochs)]
        return out + [(name, cfg.train.epochs) for name, cfg in self.students.items()]


def _teacher_task(meta: dict, task: str | None) -> str:
    """The task to distil on; `UserError` if the teacher's classes are not that task's."""
    own = meta.get("task")
    task = task or own
    if not task:
        raise UserError("the teacher checkpoint names no task; give --task")
    check_task(task)
    classes = meta["model"]["num_classes"]
    if classes != load_task(task).num_classes:
        raise UserError(f"the teacher has {classes} classes but task {task!r} has "
                        f"{load_task(task).num_classes}; distil on the teacher's own task")
    if own in TASKS and TASKS[own] != TASKS[task]:
        raise UserError(f"the teacher was trained on {own!r} whose classes differ from task "
                        f"{task!r}'s; distil on the teacher's own task or one with its classes")
    return task


def _teacher_train(meta: dict, settings: DistillSettings) -> TrainConfig:
    recipe = (meta.get("recipe") or {}).get("train") or {}
    known = {k: v for k, v in recipe.items() if k in TrainConfig.__dataclass_fields__}
    train = TrainConfig(**known)
    seed = train.seed + 1 if settings.seed is None else settings.seed
    return replace(train, seed=seed,
                   epochs=settings.epochs if settings.epochs is not None else train.epochs)


def plan_distillation(teacher_dir, settings: DistillSettings) -> DistillPlan:
    """Check the request against the teacher checkpoint and list what will train."""
    check_choice("student arch", settings.student, ARCHS)
    if settings.adversarial and settings.defensive:
        raise UserError("--adversarial and --defensive are two methods; choose one")
    if not settings.adversarial and (settings.attack_mode is not None
                                     or settings.kl_scaling != "paper"):
        raise UserError("--attack-mode and --ard-kl-scaling set up ARD; add --adversarial")
    temperature = settings.temperature
    if temperature is None:
        temperature = DISTILL_OBJECTIVES.options(
            "defensive" if settings.defensive else "kd").temperature
    check_distill_settings(temperature, settings.alpha)
    model, meta = load_checkpoint(teacher_dir)  # validates the checkpoint (cheap)
    del model
    task = _teacher_task(meta, settings.task)
    teacher_eps = float(meta.get("eps", 0.0) or 0.0)
    norm = settings.norm or (meta.get("norm") if teacher_eps > 0 else None) or "l2"
    check_choice("norm", norm, DEFAULT_EPS)
    eps = settings.eps if settings.eps is not None else (
        teacher_eps if teacher_eps > 0 and norm == meta.get("norm") else DEFAULT_EPS[norm])
    if not eps > 0:
        raise UserError(f"eps must be > 0, got {eps}")
    train = _teacher_train(meta, settings)
    steps = int((meta.get("recipe") or {}).get("attack_steps", 7))
    base = SourceConfig(task=task, arch=settings.student, attack_steps=steps, train=train)
    teacher = {"path": str(teacher_dir), "eps": teacher_eps, "norm": meta.get("norm", ""),
               "recipe": meta.get("recipe")}
    students = {"student alone": base}
    defensive_teacher = None
    if settings.defensive:
        dtrain = replace(train, lr=train.lr * max(1.0, temperature / 5), weight_decay=0.0)
        arch = meta["model"]["arch"]
        defensive_teacher = SourceConfig(task=task, arch=arch, train=dtrain)
        teacher = {"from_checkpoint": str(teacher_dir), "trained_at_temperature": temperature,
                   "eps": 0.0, "norm": norm, "recipe": defensive_teacher.to_dict()}
        cfg = DistillConfig("defensive", temperature, settings.alpha, teacher)
        students["defensive student"] = replace(base, train=dtrain, distill=cfg)
        saved = "defensive student"
    else:
        kd = DistillConfig("kd", temperature, settings.alpha, teacher)
        students["KD student"] = replace(base, distill=kd)
        saved = "KD student"
        if settings.adversarial:
            ard = DistillConfig("ard", temperature, settings.alpha, teacher,
                                settings.kl_scaling)
            students["ARD student"] = replace(base, eps=eps, norm=norm, distill=ard,
                                              method=None, on_overfit=None,
                                              attack_mode=settings.attack_mode)
            saved = "ARD student"
    return DistillPlan(str(teacher_dir), meta, temperature, eps, norm, students,
                       defensive_teacher, saved)


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack, eps: float,
            norm: str) -> dict:
    """Clean/robust accuracy and success rate of one attack (through `attacks.evaluate`,
    masking checks on), and the gradient-masking warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradientMaskingWarning)
        table = evaluate(model, x, y, [attack], [eps], norm, check=True)
    row = table[table.attack != "worst case"].iloc[0]
    fired = [str(w.message) for w in caught if issubclass(w.category, GradientMaskingWarning)]
    return {"clean": float(row.clean_accuracy), "robust": float(row.robust_accuracy),
            "success_rate": float(row.attack_success_rate), "warnings": fired}


def pgd_attack(norm: str, loss: str = "ce", steps: int = EVAL_STEPS) -> Callable:
    """A factory (model, eps) -> PGD for `evaluate`: `steps` steps on `loss` ("ce" or the
    CW margin "cw"), seed 0."""
    def make(model: nn.Module, eps: float):
        return PGD(model, eps, steps=steps, norm=norm, loss=loss, seed=0)

    make.__name__ = f"pgd-{steps}" + ("" if loss == "ce" else f"-{loss}")
    return make


def _attacks(norm: str) -> dict[str, Callable]:
    """The masking story's attacks: PGD on CE, PGD on the CW margin, CW itself (L2 only)."""
    out = {}
    for name, loss in (("PGD-CE", "ce"), ("PGD-margin (CW loss)", "cw")):
        out[name] = pgd_attack(norm, loss)
    if norm == "l2":
        def cw(model, eps):
            return CW(model, steps=CW_STEPS, search_steps=CW_SEARCH_STEPS)
        out[f"CW-L2 ({CW_STEPS} steps)"] = cw
    return out


def kl_to_teacher(student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                  temperature: float = 1.0) -> float:
    """Mean over examples of KL(softmax(t/T) || softmax(s/T)) on x."""
    t = F.log_softmax(predict_logits(teacher, x) / temperature, 1)
    s = F.log_softmax(predict_logits(student, x) / temperature, 1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True).item()


def masking_story(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                  eps: float, norm: str) -> list[dict]:
    """Per model and attack: clean, robust accuracy, success rate, masking warnings fired."""
    rows = []
    for model_name, model in models.items():
        for attack_name, attack in _attacks(norm).items():
            m = measure(model, x, y, attack, eps, norm)
            rows.append({"model": model_name, "attack": attack_name, **m})
    return rows


@dataclass
class DistillResult:
    rows: list[dict]  # per model: clean, robust (PGD-20), robustness kept, KL to teacher
    student: nn.Module  # the saved student (plan.saved)
    meta: dict  # its checkpoint metadata
    story: list[dict]  # defensive only: `masking_story` rows


def run_distillation(plan: DistillPlan, device: torch.device | str = "cpu",
                     on_epoch: Callable[[str, int], None] | None = None) -> DistillResult:
    """Train what `plan` lists; measure teacher and students on the task's test set."""
    def progress(name):
        return None if on_epoch is None else (lambda epoch: on_epoch(name, epoch))

    if plan.defensive_teacher is not None:
        cfg = plan.defensive_teacher
        teacher = build_source_model(cfg, device)
        name = plan.stages[0][0]
        callback = None if on_epoch is None else (lambda _m, e: on_epoch(name, e) or {})
        fit(teacher, load_task(cfg.task).train, cfg.train, TemperatureLoss(plan.temperature),
            callback)
        teacher_name = name
    else:
        teacher, _ = load_checkpoint(plan.teacher_dir, device)
        teacher_name = "teacher"
    models, metas = {teacher_name: teacher}, {}
    for name, cfg in plan.students.items():
        models[name], metas[name] = train_source(cfg, device, progress(name), teacher=teacher)
    test = load_task(next(iter(plan.students.values())).task).test
    rows = []
    for name, model in models.items():
        m = measure(model, test.x, test.y, pgd_attack(plan.norm), plan.eps, plan.norm)
        rows.append({"model": name, "clean": m["clean"], "robust": m["robust"],
                     "warnings": m["warnings"],
                     "kl_to_teacher": float("nan") if model is teacher else
                     kl_to_teacher(model, teacher, test.x)})
    for row in rows:
        row["robust_kept"] = row["robust"] / rows[0]["robust"] if rows[0]["robust"] else float(
            "nan")
    story = []
    if plan.defensive_teacher is not None:
        story = masking_story({k: models[k] for k in ("defensive student", "student alone")},
                              test.x, test.y, plan.eps, plan.norm)
    meta = metas[plan.saved]
    meta["comparison"] = [{k: v for k, v in r.items() if k != "warnings"} for r in rows]
    meta["eval"] = {"attack": f"pgd-{EVAL_STEPS}", "eps": plan.eps, "norm": plan.norm}
    return DistillResult(rows, models[plan.saved], meta, story)
