"""The distillation comparison as a study: a teacher checkpoint distilled into a student,
compared with the same student trained alone (and, with `adversarial`, an ARD student).

The spec (`DistillStudy`) names the teacher checkpoint (an input: its weights' sha256 enters
every id, so another checkpoint never reuses old students or runs) and the settings; what it
leaves out comes from the teacher (task, epochs, eps, norm, seed + 1) or the method (T = 4,
or 100 for defensive distillation), resolved when the spec is made. The students are the
study's artifacts, trained once each into `out/sources/<name>-<id>/` (`train.train_source`
with the teacher); the runs are the measurements, one per model and attack, each one row
(`_measure_job`): every model under PGD-20 on cross-entropy, and with `defensive` the
masking story's attacks too. Every robust number comes from `attacks.evaluate`.

Defensive distillation (Papernot et al. 2016) retrains the teacher at temperature T on the
teacher checkpoint's task and recipe (arch, epochs, batch size, seed; an artifact too), then
trains the student on its soft labels at T; both use the recipe's lr x max(1, T/5) and no
weight decay: at T the loss gradient w.r.t. the logits is T times smaller, and with the
recipe's own lr (0.1) and weight decay the logits barely grow (measured on digits-0to4,
T=100, 30 epochs: teacher 88%, student 39% clean accuracy; with lr 2.0 and no weight decay
99.6% / 99.3%). The masking story then shows Carlini & Wagner's (2016) result: at T = 1 the
softmax saturates, cross-entropy gradients vanish and PGD-CE appears to fail, while the
margin loss on logits (PGD-margin, CW) breaks the model.

Columns (the grid's vocabulary): `run_id`, `model` (teacher, student alone, KD student, ...),
`role` (teacher | student), `source_task`, `source_arch`, `seed`, `epochs`, `temperature`,
`alpha`, `attack`, `eps`, `norm`, `test_accuracy` (clean), `robust_accuracy`,
`attack_success_rate`, `kl_to_teacher` (at T = 1; NaN for the teacher) and
`masking_warnings` (the gradient-masking warnings the evaluation raised, one per line).

Example:
    study = DistillStudy(teacher=Path("runs/l2-0.5"), adversarial=True)
    table = read_results(run_study(study, "runs/ard"), study.required)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from robust_transfer.attacks import CW, PGD, GradientMaskingWarning, evaluate
from robust_transfer.data import TASKS, check_task, load_task
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import SourceCard, load_checkpoint, read_card, save_checkpoint
from robust_transfer.models.checkpoint import checkpoint_sha256
from robust_transfer.models.nets import ARCHS
from robust_transfer.studies import STUDIES, absolute, spec_record
from robust_transfer.train.distill import (
    DISTILL_OBJECTIVES,
    DistillConfig,
    TemperatureLoss,
    check_distill_settings,
    kl_to_teacher,
)
from robust_transfer.train.loop import TrainConfig, fit
from robust_transfer.train.source import (
    SourceConfig,
    build_source_model,
    source_card,
    train_source,
)
from robust_transfer.transfer.grid import worker_device
from robust_transfer.transfer.runner import SOURCES, Artifact, Unit
from robust_transfer.transfer.spec import content_id

EVAL_STEPS = 20
CW_STEPS, CW_SEARCH_STEPS = 100, 5  # enough to break defensive distillation on digits
DEFAULT_EPS = {"l2": 1.0, "linf": 0.1, "l1": 4.0}  # for a natural teacher on 8x8 digits
TEACHER, ALONE, KD, ARD, DEFENSIVE = ("teacher", "student alone", "KD student", "ARD student",
                                      "defensive student")
PGD_CE, PGD_MARGIN, CW_L2 = "PGD-CE", "PGD-margin (CW loss)", f"CW-L2 ({CW_STEPS} steps)"


@STUDIES.register
@dataclass(frozen=True)
class DistillStudy:
    """The distillation comparison. `teacher`: the teacher checkpoint (required); `student`:
    the students' arch; `temperature` None: 4, or 100 with `defensive`; `task`, `epochs`,
    `eps`, `norm` None: the teacher's (eps for a natural teacher: `DEFAULT_EPS`); `seed`
    None: the teacher's + 1 (the student alone is not a replica of the teacher);
    `adversarial`: also an ARD student (Goldblum et al. 2020) at eps/norm, its PGD examples
    made in `attack_mode` (None: train, as their code) with its KL scaled as `kl_scaling`;
    `defensive`: defensive distillation (Papernot et al. 2016) instead of KD.

    Example:
        DistillStudy(teacher=Path("runs/natural"), defensive=True)
    """

    name = "distill"
    required = ("run_id", "model", "role", "attack", "source_task", "test_accuracy",
                "robust_accuracy")

    teacher: Path | None = None
    student: str = "cnn-small"
    temperature: float | None = None
    alpha: float = 0.9
    task: str | None = None
    epochs: int | None = None
    seed: int | None = None
    adversarial: bool = False
    defensive: bool = False
    eps: float | None = None
    norm: str | None = None
    attack_mode: str | None = None  # ARD's (None: the ARD code's, train)
    kl_scaling: str = "paper"  # ARD's KL: the paper's per-example mean, or the code's / K

    def __post_init__(self) -> None:
        check_choice("student arch", self.student, ARCHS)
        if self.adversarial and self.defensive:
            raise UserError("--adversarial and --defensive are two methods; choose one")
        if not self.adversarial and (self.attack_mode is not None
                                     or self.kl_scaling != "paper"):
            raise UserError("--attack-mode and --ard-kl-scaling set up ARD; add --adversarial")
        temperature = self.temperature
        if temperature is None:
            temperature = DISTILL_OBJECTIVES.options(
                "defensive" if self.defensive else "kd").temperature
        check_distill_settings(temperature, self.alpha)
        if self.teacher is None:
            raise UserError("give the teacher checkpoint (a distill spec's `teacher: PATH`)")
        teacher = absolute(self.teacher)
        checkpoint_sha256(teacher)  # a missing or corrupt checkpoint: now, before any work
        card = read_card(teacher)
        task = _teacher_task(card, self.task)
        teacher_eps = float(card.eps or 0.0)
        norm = self.norm or (card.norm if teacher_eps > 0 else None) or "l2"
        check_choice("norm", norm, DEFAULT_EPS)
        eps = self.eps if self.eps is not None else (
            teacher_eps if teacher_eps > 0 and norm == card.norm else DEFAULT_EPS[norm])
        if not eps > 0:
            raise UserError(f"eps must be > 0, got {eps}")
        train = _teacher_train(card, self.epochs, self.seed)
        for name, value in (("teacher", teacher), ("temperature", float(temperature)),
                            ("task", task), ("eps", float(eps)), ("norm", norm),
                            ("epochs", train.epochs), ("seed", train.seed)):
            object.__setattr__(self, name, value)
        self.plan()  # validates the students' recipes

    def plan(self) -> _Plan:
        """What trains: the students (row name -> recipe, in training order), the defensive
        teacher retrained at T (defensive only), and which student is the one kept."""
        card = read_card(self.teacher)
        train = _teacher_train(card, self.epochs, self.seed)
        steps = int((card.recipe or {}).get("attack_steps", 7))
        base = SourceConfig(task=self.task, arch=self.student, attack_steps=steps, train=train)
        teacher = {"path": str(self.teacher), "eps": float(card.eps or 0.0),
                   "norm": card.norm or "", "recipe": card.recipe}
        students = {ALONE: base}
        if self.defensive:
            dtrain = replace(train, lr=train.lr * max(1.0, self.temperature / 5),
                             weight_decay=0.0)
            retrained = SourceConfig(task=self.task, arch=card.model.arch, train=dtrain)
            teacher = {"from_checkpoint": str(self.teacher),
                       "trained_at_temperature": self.temperature, "eps": 0.0,
                       "norm": self.norm, "recipe": retrained.to_dict()}
            cfg = DistillConfig("defensive", self.temperature, self.alpha, teacher)
            students[DEFENSIVE] = replace(base, train=dtrain, distill=cfg)
            return _Plan(students, retrained, DEFENSIVE)
        students[KD] = replace(base, distill=DistillConfig("kd", self.temperature, self.alpha,
                                                           teacher))
        if not self.adversarial:
            return _Plan(students, None, KD)
        ard = DistillConfig("ard", self.temperature, self.alpha, teacher, self.kl_scaling)
        students[ARD] = replace(base, eps=self.eps, norm=self.norm, distill=ard, method=None,
                                on_overfit=None, attack_mode=self.attack_mode)
        return _Plan(students, None, ARD)

    def record(self) -> dict:
        return spec_record(self)

    def models(self, out: Path) -> dict[str, Path]:
        """Every model measured, teacher first (the checkpoint, or the defensive teacher),
        by name -> its directory."""
        plan, sha = self.plan(), checkpoint_sha256(self.teacher)
        teacher = {TEACHER: self.teacher} if plan.retrained is None else {
            self.retrained_name: _artifact_dir(out, self.retrained_name, plan.retrained, sha)}
        return teacher | {name: _artifact_dir(out, name, cfg, sha)
                          for name, cfg in plan.students.items()}

    @property
    def retrained_name(self) -> str:
        return f"teacher at T={self.temperature:g}"

    def measurements(self, out: Path) -> list[_Measurement]:
        """Every run: each model under PGD-CE (PGD-20); with `defensive`, the student alone
        and the defensive student also under the CW margin loss and (L2) CW itself."""
        models = self.models(out)
        teacher_name, teacher_dir = next(iter(models.items()))
        # a model's identity: its artifact's directory name (recipe and teacher weights), or
        # "teacher" for the checkpoint (its weights' hash is in every id)
        ids = {n: TEACHER if d == self.teacher else d.name for n, d in models.items()}
        sha = checkpoint_sha256(self.teacher)
        story = [PGD_MARGIN] + ([CW_L2] if self.norm == "l2" else [])
        runs = []
        for name, directory in models.items():
            is_teacher = name == teacher_name
            attacks = [PGD_CE] + (story if self.defensive and name in (ALONE, DEFENSIVE) else [])
            for attack in attacks:
                identity = {"study": self.name, "teacher_sha256": sha, "task": self.task,
                            "model": ids[name],
                            "reference": None if is_teacher else ids[teacher_name],
                            "attack": attack, "eps": self.eps, "norm": self.norm}
                runs.append(_Measurement(
                    content_id(identity), name, "teacher" if is_teacher else "student",
                    directory, None if is_teacher else teacher_dir, attack, self.task,
                    self.eps, self.norm, self.temperature, self.alpha))
        return runs

    def run_ids(self) -> list[str]:
        # ids take the artifacts' directory names only, never the folder they are in
        return [m.run_id for m in self.measurements(Path("."))]

    def artifacts(self, out: Path, device: str) -> list[list[Artifact]]:
        """The defensive teacher first (its student learns from it), then the students."""
        plan, models = self.plan(), self.models(out)
        teacher_dir = next(iter(models.values()))
        students = [Artifact(models[n], _train_student,
                             _StudentJob(cfg, teacher_dir, models[n], device))
                    for n, cfg in plan.students.items()]
        if plan.retrained is None:
            return [students]
        retrained = Artifact(teacher_dir, _train_retrained_teacher, _TeacherJob(
            plan.retrained, self.temperature, self.teacher, teacher_dir, device))
        learns = [a for a in students if a.job.config.distill is not None]
        return [[retrained, *[a for a in students if a not in learns]], learns]

    def units(self, pending: list[str], out: Path, device: str) -> list[Unit]:
        todo = set(pending)
        return [Unit((m.run_id,), _measure_job, replace(m, device=device))
                for m in self.measurements(out) if m.run_id in todo]


def _teacher_task(card: SourceCard, task: str | None) -> str:
    """The task to distil on; `UserError` if the teacher's classes are not that task's."""
    own = card.task
    task = task or own
    if not task:
        raise UserError("the teacher checkpoint names no task; give --task")
    check_task(task)
    classes = card.model.num_classes
    if classes != load_task(task).num_classes:
        raise UserError(f"the teacher has {classes} classes but task {task!r} has "
                        f"{load_task(task).num_classes}; distil on the teacher's own task")
    if own in TASKS and TASKS[own] != TASKS[task]:
        raise UserError(f"the teacher was trained on {own!r} whose classes differ from task "
                        f"{task!r}'s; distil on the teacher's own task or one with its classes")
    return task


def _teacher_train(card: SourceCard, epochs: int | None, seed: int | None) -> TrainConfig:
    """The teacher's training recipe, with the students' `epochs` and `seed` (None: the
    teacher's epochs, its seed + 1)."""
    known = {k: v for k, v in card.train_recipe.items()
             if k in TrainConfig.__dataclass_fields__}
    train = TrainConfig(**known)
    return replace(train, seed=train.seed + 1 if seed is None else seed,
                   epochs=train.epochs if epochs is None else epochs)


@dataclass(frozen=True)
class _Plan:
    students: dict[str, SourceConfig]  # row name -> recipe, in training order
    retrained: SourceConfig | None  # the teacher retrained at T (defensive only)
    kept: str  # the student the study is about (ARD, KD or defensive)


def _artifact_dir(out: Path, name: str, cfg: SourceConfig, teacher_sha: str) -> Path:
    """`out/sources/<name>-<id>`: the id hashes the recipe and the teacher's weights (not
    its path: the same teacher elsewhere reuses the students)."""
    recipe = cfg.to_dict()
    if "distill" in recipe:
        teacher = recipe["distill"]["teacher"]
        recipe["distill"] = {**recipe["distill"], "teacher": {
            k: v for k, v in teacher.items() if k not in ("path", "from_checkpoint")}}
    slug = name.replace(" ", "-").replace("=", "").lower()
    return Path(out) / SOURCES / f"{slug}-{content_id({'teacher': teacher_sha, **recipe}, 8)}"


@dataclass(frozen=True)
class _StudentJob:
    config: SourceConfig
    teacher_dir: Path  # the model it learns from: the checkpoint or the retrained teacher
    directory: Path
    device: str = "cpu"


def _train_student(job: _StudentJob) -> Path:
    """`train_source` with its teacher (the student alone ignores it), saved."""
    device = worker_device(job.device)
    teacher, _ = load_checkpoint(job.teacher_dir, device)
    model, card = train_source(job.config, device, teacher=teacher)
    return save_checkpoint(model, job.directory, card)


@dataclass(frozen=True)
class _TeacherJob:
    config: SourceConfig
    temperature: float
    checkpoint: Path
    directory: Path
    device: str = "cpu"


def _train_retrained_teacher(job: _TeacherJob) -> Path:
    """The defensive teacher: the checkpoint's recipe trained at temperature T, saved."""
    device = worker_device(job.device)
    model = build_source_model(job.config, device)
    history = fit(model, load_task(job.config.task).train, job.config.train,
                  TemperatureLoss(job.temperature))
    card = source_card(job.config, {"final_train_loss": history[-1]["train_loss"]}, device,
                       None)
    card.extra.update(trained_at_temperature=job.temperature,
                      from_checkpoint=str(job.checkpoint))
    return save_checkpoint(model, job.directory, card)


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


def _cw(model: nn.Module, eps: float):
    return CW(model, steps=CW_STEPS, search_steps=CW_SEARCH_STEPS)


def attack_factory(name: str, norm: str) -> Callable:
    """The study's attacks by name: PGD-20 on CE, PGD-20 on the CW margin, CW-L2."""
    return {PGD_CE: pgd_attack(norm), PGD_MARGIN: pgd_attack(norm, "cw"), CW_L2: _cw}[name]


@dataclass(frozen=True)
class _Measurement:
    run_id: str
    model: str
    role: str  # teacher | student
    directory: Path
    teacher_dir: Path | None  # the teacher a student's KL is to (None: the teacher itself)
    attack: str
    task: str
    eps: float
    norm: str
    temperature: float
    alpha: float
    device: str = "cpu"


def _measure_job(job: _Measurement) -> list[list[dict]]:
    """One model under one attack on the task's test set: one row."""
    device = worker_device(job.device)
    model, card = load_checkpoint(job.directory, device)
    test = load_task(job.task).test
    m = measure(model, test.x, test.y, attack_factory(job.attack, job.norm), job.eps, job.norm)
    kl = float("nan")
    if job.teacher_dir is not None:
        teacher, _ = load_checkpoint(job.teacher_dir, device)
        kl = kl_to_teacher(model, teacher, test.x)
    return [[{"model": job.model, "role": job.role, "source_task": job.task,
              "source_arch": card.model.arch, "seed": -1 if card.seed is None else card.seed,
              "epochs": int(card.train_recipe.get("epochs", -1)), "temperature": job.temperature,
              "alpha": job.alpha, "attack": job.attack, "eps": job.eps, "norm": job.norm,
              "test_accuracy": m["clean"], "robust_accuracy": m["robust"],
              "attack_success_rate": m["success_rate"], "kl_to_teacher": kl,
              "masking_warnings": "\n".join(m["warnings"])}]]
