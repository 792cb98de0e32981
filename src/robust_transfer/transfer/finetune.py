"""The fine-tuning protocol of arXiv 2007.05869 (Utrera et al., "Adversarially-trained deep
nets transfer better"): re-initialise the head for the target classes, unfreeze only the last
k blocks, train on n images per class, record test accuracy after every epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from robust_transfer.data import load_task, shots_per_class
from robust_transfer.data.tasks import TASKS, Shots, parse_shots
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.nets import ConvNet
from robust_transfer.models.runtime import accuracy
from robust_transfer.train import TrainConfig, fit, freeze_all_but_last


def parse_blocks(value: int | str | None) -> int | None:
    """Unfrozen blocks from the user: an int >= 0, or "all" (returned as None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = -1
    if k < 0 or isinstance(value, bool) or (isinstance(value, float) and value != k):
        raise UserError(f"unfrozen blocks must be an integer >= 0 or 'all', got {value!r}")
    return k


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tune. `images_per_class` is an int or "all" (`parse_shots`: the one type it
    keeps from the spec to the results table); `unfrozen_blocks` None means all blocks."""

    target_task: str = "digits-5to9"
    images_per_class: Shots = 5
    unfrozen_blocks: int | None = 0
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("task", self.target_task, TASKS)
        object.__setattr__(self, "images_per_class", parse_shots(self.images_per_class))
        object.__setattr__(self, "unfrozen_blocks", parse_blocks(self.unfrozen_blocks))

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
            schedule="step",
        )

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(model: ConvNet, cfg: FinetuneConfig,
             on_epoch: Callable[[nn.Module, int], dict] | None = None) -> list[dict]:
    """Fine-tune `model` in place on `cfg.target_task`; one record per epoch.

    The same seed draws the same k-shot subset and the same new head whichever source is
    being fine-tuned, so natural and robust sources are compared on identical data.
    Records: epoch, train_loss, epoch_lr, train_images, test_accuracy, plus whatever
    `on_epoch(model, epoch)` returns (e.g. a backdoor's ASR on the target test set).
    """
    task = load_task(cfg.target_task)
    if task.input_shape[0] != model.spec.in_channels:
        raise UserError(
            f"target task {cfg.target_task!r} has {task.input_shape[0]} channels but the "
            f"source model takes {model.spec.in_channels}"
        )
    train = task.train.subset(shots_per_class(task.train.y, cfg.images_per_class, cfg.seed))
    device = next(model.parameters()).device
    model.reset_head(task.num_classes, torch.Generator().manual_seed(cfg.seed))
    freeze_all_but_last(model, cfg.unfrozen_blocks)
    test_x, test_y = task.test.x.to(device), task.test.y.to(device)

    def test_accuracy(m, epoch):
        record = {"train_images": len(train), "test_accuracy": accuracy(m, test_x, test_y)}
        return record if on_epoch is None else {**record, **on_epoch(m, epoch)}

    return fit(model, train, cfg.train_config(), on_epoch=test_accuracy)
