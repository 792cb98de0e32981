"""The one training loop: SGD + momentum + weight decay, a per-epoch LR schedule, a seed.

Natural training, PGD adversarial training and fine-tuning all run through `fit`; they differ
only in the objective (`train.objectives`) and in which parameters are trainable.

On CUDA, `fit` runs the objective (its forward, and the attack of an adversarial objective)
under bf16 autocast (Micikevicius et al. 2018, "Mixed Precision Training"; bf16 needs no loss
scaling) and keeps conv nets channels-last (the layout tensor cores read); both are off on CPU
unless asked for, so CPU numbers are bit-identical to a loop without them. The optimiser step
and the weights stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from robust_transfer.data import ImageSet
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import autocast
from robust_transfer.train.freeze import set_train_mode
from robust_transfer.train.objectives import Objective, natural_loss

SCHEDULES = ("step", "cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule. `step` decays LR by 10x every epochs//3 epochs (the paper's)."""

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
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Channels-last helps conv nets on CUDA (cuDNN's NHWC kernels); not on CPU."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def fit(
    model: nn.Module,
    data: ImageSet,
    cfg: TrainConfig,
    objective: Objective = natural_loss,
    on_epoch: Callable[[nn.Module, int], dict] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp: bool | None = None,
) -> list[dict]:
    """Train the parameters of `model` that require grad to minimise `objective`; return one
    record per epoch.

    Each record has `epoch`, `train_loss` (mean over the epoch's examples), `epoch_lr`, plus
    whatever `on_epoch(model, epoch)` returns (e.g. test accuracy). Frozen blocks keep
    BatchNorm in eval mode throughout. Leaves the model in eval mode.

    `augment(x)` (e.g. `data.augment.RandomCropFlip`) transforms each training batch on the
    device before the objective sees it. `amp`: bf16 autocast (None: on CUDA only).
    """
    device = next(model.parameters()).device
    channels_last = use_channels_last(model, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    schedule = _scheduler(opt, cfg)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    cuda = device.type == "cuda"  # pinned host memory: an asynchronous copy to the GPU
    x_all, y_all = ((t.pin_memory() if cuda and not t.is_cuda else t).to(device, non_blocking=cuda)
                    for t in (data.x, data.y))
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
            if augment is not None:
                x = augment(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(replays):
                with autocast(device, amp):
                    loss = objective(model, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            total += loss.detach().float() * len(idx)
        schedule.step()
        model.eval()
        record = {"epoch": epoch, "train_loss": total.item() / len(data), "epoch_lr": lr}
        if on_epoch is not None:
            record.update(on_epoch(model, epoch))
        history.append(record)
    model.eval()
    return history
