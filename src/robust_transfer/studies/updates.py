"""Backdoor survival under model updates (Li et al. 2022, arXiv 2206.04677) as a study.

The spec (`SurvivalStudy`): a BadNets-poisoned source per seed, trained here (an artifact,
`out/sources/<id>/`), or one poisoned checkpoint the user gives (`checkpoint`: its weights'
sha256 enters every run id, so another checkpoint never reuses old runs); then `updates`
updates for every seed x update schedule (images per update x LR schedule) x drift kind x
drift strength. One run = one such arm: the curve of update 0..U (`backdoors.updates`'s
`survival_curve`, which holds the algorithm), one row per update. At strength 0 every drift
kind is the same plain clean update, so those runs are computed once, as drift
`DRIFTS[0]`, and their rows labelled with each drift kind (`_curve_job`).

Columns (the grid's vocabulary): `run_id`, `seed`, `source_task`, `source_arch`,
`source_backdoor` (the attack), `poison_rate`, `target`, `num_classes`, `source` (trained |
checkpoint), `drift`, `strength`, `updates`, `schedule` (its label), `train_images` and
`epochs` (of each update), `batch_size`, `lr_schedule`, `lr` (the update's peak LR), then per
update: `update`, `magnitude`, `train_loss`, `test_accuracy` (C-Acc on the original test
set), `drift_accuracy`, `asr`, `ra`, `drift_asr`.

Example:
    study = SurvivalStudy(drifts=("rotation",), strengths=(0.0, 1.0), seeds=(0, 1))
    table = read_results(run_study(study, "runs/updates"), study.required)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from robust_transfer.backdoors.source import recorded_backdoor
from robust_transfer.backdoors.updates import (
    LR_SCHEDULES,
    UpdateConfig,
    check_positive_int,
    survival_curve,
)
from robust_transfer.data import load_task
from robust_transfer.data.drift import DRIFTS, check_strength
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.data.triggers import TRIGGERS
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import load_checkpoint, read_card
from robust_transfer.models.checkpoint import checkpoint_sha256
from robust_transfer.studies import STUDIES, absolute, spec_record
from robust_transfer.train import SourceConfig, TrainConfig
from robust_transfer.transfer.grid import SourceJob, train_source_job, worker_device
from robust_transfer.transfer.runner import SOURCES, Artifact, Unit
from robust_transfer.transfer.spec import content_id, source_id

DEFAULT_TASK = "digits"


@STUDIES.register
@dataclass(frozen=True)
class SurvivalStudy:
    """The survival study: a poisoned source per seed (`task`, `backdoor`, `source_epochs`,
    `source_lr`), or the poisoned `checkpoint` for every seed (its task and backdoor; seeds
    then vary the update data only); then `updates` updates for every drift kind x strength
    in [0, 1] x images per update (`update_images`) x LR schedule; the rest is
    `backdoors.updates.UpdateConfig`'s. `task` None: digits, or the checkpoint's; `backdoor`
    None: BadNets at rate 0.1 to class 0, or the checkpoint's (a given one must match it).

    Example:
        SurvivalStudy(strengths=(0.0, 1.0), seeds=(0,))   # 2 strengths x 2 drifts x 2 LRs
    """

    name = "backdoor-updates"
    required = ("run_id", "seed", "source_task", "drift", "strength", "train_images",
                "lr_schedule", "update", "test_accuracy", "asr")

    task: str | None = None
    checkpoint: Path | None = None
    backdoor: BackdoorConfig | dict | None = None
    source_epochs: int = 20
    source_lr: float = 0.1
    drifts: tuple[str, ...] = DRIFTS
    strengths: tuple[float, ...] = (0.0, 0.5, 1.0)
    updates: int = 5
    update_images: tuple[int, ...] = (300,)
    update_epochs: int = 5
    lr: float = 0.01
    lr_schedules: tuple[str, ...] = LR_SCHEDULES
    fast_lr: float = 0.1
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        for name in ("drifts", "strengths", "update_images", "lr_schedules", "seeds"):
            value = tuple(getattr(self, name))
            if not value:
                raise UserError(f"give at least one value for {name.replace('_', ' ')}")
            if len(set(value)) != len(value):
                raise UserError(f"repeated value in {name.replace('_', ' ')}: {list(value)}")
            object.__setattr__(self, name, value)
        for d in self.drifts:
            check_choice("drift", d, DRIFTS)
        object.__setattr__(self, "strengths", tuple(check_strength(s) for s in self.strengths))
        check_positive_int("updates", self.updates)
        check_positive_int("source epochs", self.source_epochs)
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise UserError(f"seeds must be integers >= 0, got {seed!r}")
        self.update_configs()  # validates images, epochs, LRs, schedules
        backdoor = self.backdoor
        if isinstance(backdoor, dict):
            backdoor = BackdoorConfig.from_dict(backdoor)
        if self.checkpoint is not None:
            self._from_checkpoint(backdoor)
        else:
            object.__setattr__(self, "task", self.task or DEFAULT_TASK)
            object.__setattr__(self, "backdoor", backdoor or BackdoorConfig())
            self.source(self.seeds[0])  # a bad task or target: now, before any work
        if self.backdoor.attack not in TRIGGERS:
            raise UserError(f"backdoor updates needs a data-poisoning backdoor "
                            f"({', '.join(TRIGGERS)}), not {self.backdoor.attack!r}")

    def _from_checkpoint(self, given: BackdoorConfig | None) -> None:
        """Task and backdoor from the checkpoint's metadata (`UserError` if it is not a
        data-poisoned model, or a given task or backdoor differs from its own)."""
        object.__setattr__(self, "checkpoint", absolute(self.checkpoint))
        checkpoint_sha256(self.checkpoint)  # corrupt weights: now, before any work
        card = read_card(self.checkpoint)
        backdoor = recorded_backdoor(card)
        if self.task is not None and self.task != card.task:
            raise UserError(f"task {self.task!r} differs from the checkpoint's task "
                            f"{card.task!r}; leave the task out with a checkpoint")
        if given is not None and given != backdoor:
            raise UserError("the backdoor given differs from the checkpoint's; leave it out "
                            "with a checkpoint")
        object.__setattr__(self, "task", card.task)
        object.__setattr__(self, "backdoor", backdoor)

    def update_configs(self) -> list[UpdateConfig]:
        return [UpdateConfig(images, self.update_epochs, self.lr, schedule, self.fast_lr,
                             self.batch_size)
                for images in self.update_images for schedule in self.lr_schedules]

    def source(self, seed: int) -> SourceConfig:
        """The poisoned source of `seed` (its backdoor's poisoned images drawn with it too)."""
        return SourceConfig(task=self.task, backdoor=replace(self.backdoor, seed=seed),
                            train=TrainConfig(epochs=self.source_epochs, lr=self.source_lr,
                                              seed=seed))

    def record(self) -> dict:
        record = spec_record(self)
        record["backdoor"] = self.backdoor.to_dict()
        if self.checkpoint is None:
            record.pop("checkpoint")
        return record

    def arms(self) -> list[_Arm]:
        """Every run, in the order of the table: seed, update schedule, drift, strength."""
        sha = None if self.checkpoint is None else checkpoint_sha256(self.checkpoint)
        arms = []
        for seed in self.seeds:
            source = self.source(seed) if sha is None else None
            backdoor = self.backdoor if source is None else source.backdoor
            identity = {"checkpoint_sha256": sha} if source is None else source.to_dict()
            for update in self.update_configs():
                for drift in self.drifts:
                    for strength in self.strengths:
                        arm = _Arm(seed, source, backdoor, drift, strength, update)
                        arms.append(replace(arm, run_id=content_id({
                            "study": self.name, "source": identity, "task": self.task,
                            "backdoor": backdoor.to_dict(), "updates": self.updates,
                            "update": vars(update), "drift": drift, "strength": strength,
                            "seed": seed})))
        return arms

    def run_ids(self) -> list[str]:
        return [a.run_id for a in self.arms()]

    def artifacts(self, out: Path, device: str) -> list[list[Artifact]]:
        if self.checkpoint is not None:
            return []
        jobs = [SourceJob(self.source(s), _source_dir(out, self.source(s)), device)
                for s in self.seeds]
        return [[Artifact(j.directory, train_source_job, j) for j in jobs]]

    def units(self, pending: list[str], out: Path, device: str) -> list[Unit]:
        """One unit per pending run, but the pending runs of one seed and update schedule at
        strength 0 together (one curve serves every drift kind)."""
        todo = set(pending)
        groups: dict[tuple, list[_Arm]] = {}
        for arm in self.arms():
            if arm.run_id in todo:
                key = (arm.seed, arm.update) if arm.strength == 0 else (arm.run_id,)
                groups.setdefault(key, []).append(arm)
        units = []
        for arms in groups.values():
            first = arms[0]
            directory = self.checkpoint if first.source is None else _source_dir(
                out, first.source)
            job = _CurveJob(directory, self.task, first.backdoor, tuple(a.drift for a in arms),
                            first.strength, self.updates, first.update, first.seed,
                            "checkpoint" if first.source is None else "trained", device)
            units.append(Unit(tuple(a.run_id for a in arms), _curve_job, job))
        return units


@dataclass(frozen=True)
class _Arm:
    seed: int
    source: SourceConfig | None  # None: the spec's checkpoint
    backdoor: BackdoorConfig
    drift: str
    strength: float
    update: UpdateConfig
    run_id: str = ""


def _source_dir(out: Path, source: SourceConfig) -> Path:
    return Path(out) / SOURCES / source_id(source)


@dataclass(frozen=True)
class _CurveJob:
    """Runs of one curve: `drifts` holds one drift kind, or several at strength 0."""

    source_dir: Path
    task: str
    backdoor: BackdoorConfig
    drifts: tuple[str, ...]
    strength: float
    updates: int
    update: UpdateConfig
    seed: int
    source: str  # trained | checkpoint
    device: str = "cpu"


def _curve_job(job: _CurveJob) -> list[list[dict]]:
    """The rows of each run of `job` (one per update 0..U), from the source on disk."""
    model, card = load_checkpoint(job.source_dir, worker_device(job.device))
    task = load_task(job.task)
    computed = job.drifts[0] if job.strength > 0 else DRIFTS[0]  # no drift: every kind's
    curve = survival_curve(model, task, job.backdoor, computed, job.strength, job.updates,
                           job.update, job.seed)
    u, b = job.update, job.backdoor
    common = {"seed": job.seed, "source_task": job.task, "source_arch": card.model.arch,
              "num_classes": task.num_classes, "source_backdoor": b.attack,
              "poison_rate": b.rate, "target": b.target, "source": job.source,
              "strength": job.strength, "updates": job.updates, "schedule": u.label,
              "train_images": u.images, "epochs": u.epochs, "batch_size": u.batch_size,
              "lr_schedule": u.lr_schedule, "lr": u.peak_lr}
    return [[{**common, "drift": drift, **record} for record in curve] for drift in job.drifts]
