"""The one training loop: SGD + momentum + weight decay, a per-epoch LR schedule, a seed.

Natural training, PGD adversarial training and fine-tuning all run through `fit`; they differ
only in the objective (`train.objectives`) and in which parameters are trainable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from robust_transfer.data import ImageSet
from robust_transfer.errors import UserError, check_choice
from robust_transfer.train.freeze import set_train_mode
from robust_transfer.train.objectives import Objective, natural_loss

SCHEDULES = ("step", "cosine", "constant", "triangular")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule. `step` decays LR by 10x every epochs//3 epochs (the paper's);
    `triangular` is one cycle of a triangular cyclic LR (Smith 2017) over the run, set per
    epoch: rising linearly to `lr` at mid-training and falling back (super-fine-tuning,
    Sha et al. 2022, runs two such cycles)."""

    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    schedule: str = "step"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError(
                f"epochs and batch size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise UserError(f"bad optimiser settings: lr={self.lr}, wd={self.weight_decay}, "
                            f"momentum={self.momentum}")

    def to_dict(self) -> dict:
        return asdict(self)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "triangular":  # epoch e of E at 1 - |2 (e + 1/2) / E - 1| of the peak
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: 1.0 - abs(2.0 * (e + 0.5) / cfg.epochs - 1.0))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def fit(
    model: nn.Module,
    data: ImageSet,
    cfg: TrainConfig,
    objective: Objective = natural_loss,
    on_epoch: Callable[[nn.Module, int], dict] | None = None,
) -> list[dict]:
    """Train the parameters of `model` that require grad to minimise `objective`; return one
    record per epoch.

    Each record has `epoch`, `train_loss` (mean over the epoch's examples), `epoch_lr`, plus
    whatever `on_epoch(model, epoch)` returns (e.g. test accuracy). Frozen blocks keep
    BatchNorm in eval mode throughout. Leaves the model in eval mode.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    schedule = _scheduler(opt, cfg)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = data.x.to(device), data.y.to(device)
    replays = int(getattr(objective, "replays", 1))
    history = []
    for epoch in range(1, cfg.epochs + 1):
        lr = opt.param_groups[0]["lr"]
        order = torch.randperm(len(data), generator=shuffle).to(device)
        total = torch.zeros((), device=device)
        set_train_mode(model)  # attacks restore every module's flag, so once per epoch
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x, y = x_all[idx], y_all[idx]
            for _ in range(replays):
                loss = objective(model, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            total += loss.detach() * len(idx)
        schedule.step()
        model.eval()
        record = {"epoch": epoch, "train_loss": total.item() / len(data), "epoch_lr": lr}
        if on_epoch is not None:
            record.update(on_epoch(model, epoch))
        history.append(record)
    model.eval()
    return history
