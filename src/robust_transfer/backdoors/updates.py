"""Backdoors in time-varying models: does a one-shot BadNets backdoor survive model updates?

After Li, Bhagoji, Chen, Zheng and Zhao 2022, "On the Permanence of Backdoors in Evolving
Models" (arXiv 2206.04677; v1 "Can Backdoor Attacks Survive Time-Varying Models?"): a model is
poisoned once, deployed, then updated periodically by fine-tuning on fresh clean data whose
distribution drifts (`data.drift`). Their findings, which this study re-measures on a small
scale: one-shot backdoors fade within a few updates, faster the larger the drift between old
and new data, and a "smart" learning rate — a larger one during the update — makes them fade
faster still.

Protocol (one arm = one seed, drift kind, strength, update schedule and LR schedule):

- update 0 is the poisoned model itself (`backdoors.source.train_backdoor_source`, BadNets,
  rate 0.1, target 0; trained once per seed and shared by every arm of that seed, or an
  existing checkpoint);
- update t = 1..U continues from update t-1's weights (a time-varying model): `images` clean
  training images drawn with the class priors of drift magnitude strength * t / U, shifted
  (rotated) by it, then `train.fit` for `epochs` with a fresh SGD optimiser;
- the default update is small and constant-LR (`lr` 0.01, like BackdoorBench's FT); the
  fast-forgetting schedule is a triangular cycle per update peaking at `fast_lr` 0.1 — a warm
  restart at every update (Smith 2017's triangular policy; Sha et al. 2022's super-fine-tuning
  shows such a large cyclic peak removes backdoors that small-LR fine-tuning keeps). It is our
  stand-in for Li et al.'s smart learning rate, not their exact scheduler.

After every update: C-Acc on the original test set, C-Acc under the current drift (the test set
rotated, or reweighted by p_t(y) / (1/K) for a class-prior shift; equal to C-Acc at update 0),
ASR / RA of the trigger on the original test set (`backdoors.metrics.backdoor_metrics`), and
ASR under the current drift (`drift_metrics`: the trigger stamped on the drifted test images).
Draws are paired: the update data of seed s, update t use the same sampling seed in every arm.
The study that runs every arm (sources, run ids, rows) is `studies.updates`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from robust_transfer.backdoors.metrics import backdoor_metrics, clean_and_triggered_predictions
from robust_transfer.data import ImageSet, Task
from robust_transfer.data.drift import (
    ROTATION_DEGREES,
    class_prior_sample,
    class_priors,
    drift_magnitude,
    rotate,
    shift_inputs,
)
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.errors import UserError, check_choice
from robust_transfer.train import TrainConfig, fit

LR_SCHEDULES = ("constant", "triangular")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class UpdateConfig:
    """How one model update trains: `images` fresh clean images, `epochs` over them, SGD with
    `lr_schedule` constant (at `lr`) or triangular (one cycle per update, peak `fast_lr`).

    Example:
        UpdateConfig(images=300, epochs=5).train(seed=3)   # the update's TrainConfig
    """

    images: int = 300
    epochs: int = 5
    lr: float = 0.01
    lr_schedule: str = "constant"
    fast_lr: float = 0.1
    batch_size: int = 32

    def __post_init__(self) -> None:
        check_choice("lr schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("images", "epochs", "batch_size"):
            check_positive_int(f"update {name.replace('_', ' ')}", getattr(self, name))
        if not self.lr > 0 or not self.fast_lr > 0:
            raise UserError(f"update learning rates must be > 0, got lr {self.lr}, fast lr "
                            f"{self.fast_lr}")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr_schedule == "constant" else self.fast_lr

    @property
    def label(self) -> str:
        """The update schedule, as the figure and the summary name it."""
        return f"{self.images} images x {self.epochs} epochs"

    def train(self, seed: int) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.peak_lr, schedule=self.lr_schedule,
                           batch_size=self.batch_size, seed=seed)


def _step_seed(seed: int, step: int) -> int:
    return 1000 * seed + step


def update_data(task: Task, drift: str, magnitude: float, images: int, seed: int,
                step: int) -> ImageSet:
    """The clean data of update `step`: `images` training images drawn with the class priors
    of the drift (uniform unless `class-prior`), shifted by it (`data.drift`)."""
    priors = class_priors(task.num_classes, magnitude if drift == "class-prior" else 0.0, seed)
    index = class_prior_sample(task.train.y, priors, images, _step_seed(seed, step))
    return ImageSet(shift_inputs(task.train.x[index], drift, magnitude), task.train.y[index])


def current_test_set(task: Task, drift: str, magnitude: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test set as the drifted deployment sees it: (images, per-image weights). Rotation
    rotates the images (weights 1); a class-prior shift keeps them and weights each by
    p_t(y) / (1/K) (the test split is stratified, so near-balanced)."""
    if drift == "rotation":
        return rotate(task.test.x, magnitude * ROTATION_DEGREES), torch.ones(len(task.test.y))
    weights = class_priors(task.num_classes, magnitude if drift == "class-prior" else 0.0,
                           seed)[task.test.y]
    return task.test.x, weights


def _weighted_share(hit: torch.Tensor, weights: torch.Tensor) -> float:
    return float((weights * hit.float()).sum() / weights.sum()) if len(hit) else float("nan")


def drift_metrics(model: nn.Module, task: Task, backdoor: BackdoorConfig, drift: str,
                  magnitude: float, seed: int) -> dict:
    """C-Acc and ASR on the current distribution (`current_test_set`), from one pass over the
    drifted test images, clean and triggered: `drift_accuracy`, and `drift_asr` with the
    trigger stamped on the drifted images (after the drift, as an attacker at deployment
    would) over the images whose class is not the target (all-to-all: every image, wanting
    (y + 1) mod K); both weighted by the current class priors."""
    x, weights = current_test_set(task, drift, magnitude, seed)
    y = task.test.y
    clean, triggered, num_classes = clean_and_triggered_predictions(
        model, x, backdoor.trigger(task.input_shape))
    keep = torch.ones_like(y, dtype=torch.bool) if backdoor.labels == "all-to-all" else (
        y != backdoor.target)
    hit = triggered == backdoor.backdoor_labels(y, num_classes)
    return {"drift_accuracy": _weighted_share(clean == y, weights),
            "drift_asr": _weighted_share(hit[keep], weights[keep])}


def evaluate_update(model: nn.Module, task: Task, backdoor: BackdoorConfig, drift: str,
                    magnitude: float, seed: int) -> dict:
    """C-Acc (`test_accuracy`) and ASR of the backdoor on the original test set (with RA), and
    both under the current drift."""
    target = backdoor.target if backdoor.labels == "all-to-one" else None
    m = backdoor_metrics(model, task.test.x, task.test.y, backdoor.trigger(task.input_shape),
                         target, backdoor.labels)
    drifted = drift_metrics(model, task, backdoor, drift, magnitude, seed)
    return {"test_accuracy": m["clean_accuracy"], "drift_accuracy": drifted["drift_accuracy"],
            "asr": m["asr"], "ra": m["ra"], "drift_asr": drifted["drift_asr"]}


def survival_curve(model: nn.Module, task: Task, backdoor: BackdoorConfig, drift: str,
                   strength: float, updates: int, update: UpdateConfig, seed: int,
                   on_update: Callable[[], None] | None = None) -> list[dict]:
    """Update a copy of poisoned `model` `updates` times on drifting clean data; one record
    per update 0..updates (0: the poisoned model) with its magnitude, metrics, train loss."""
    model = copy.deepcopy(model).requires_grad_(True)
    records = [{"update": 0, "magnitude": 0.0, "train_loss": float("nan"),
                **evaluate_update(model, task, backdoor, drift, 0.0, seed)}]
    for step in range(1, updates + 1):
        magnitude = drift_magnitude(strength, step, updates)
        data = update_data(task, drift, magnitude, update.images, seed, step)
        history = fit(model, data, update.train(_step_seed(seed, step)))
        records.append({"update": step, "magnitude": magnitude,
                        "train_loss": history[-1]["train_loss"],
                        **evaluate_update(model, task, backdoor, drift, magnitude, seed)})
        if on_update is not None:
            on_update()
    return records
