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

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from robust_transfer.data import ImageSet
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import autocast
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


def lr_schedule(cfg: TrainConfig) -> list[float]:
    """The learning rate of each epoch exactly as `fit` sets it (its scheduler, replayed on a
    dummy optimiser), for code that trains many runs at once (`transfer.batched`)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = _scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: a no-op, but the scheduler expects it before its step
        schedule.step()
    return lrs


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor],
             bufs: list[torch.Tensor] | None, lr: float, cfg: TrainConfig) -> list[torch.Tensor]:
    """One step of `torch.optim.SGD` (weight decay, momentum, no dampening) on plain tensors,
    in place, for the batched engines that train many runs' stacked parameters at once:
    d = g + wd*p; buf = m*buf + d (buf = d on the first step); p -= lr*buf. Returns the
    momentum buffers to pass to the next step."""
    with torch.no_grad():
        steps = torch._foreach_add(grads, params, alpha=cfg.weight_decay)
        if bufs is None:
            bufs = [s.clone() for s in steps]
        else:
            torch._foreach_mul_(bufs, cfg.momentum)
            torch._foreach_add_(bufs, steps)
        torch._foreach_add_(params, bufs, alpha=-lr)
    return bufs


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Channels-last helps conv nets on CUDA (cuDNN's NHWC kernels); not on CPU."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each minibatch of an epoch over n examples: batches of `batch_size`,
    the last one partial, except that a last batch of a single example joins the one before
    (BatchNorm cannot train on one example where a block's output is 1x1, e.g. a torchvision
    ResNet's last stage on 32x32 images). Both training engines batch by it."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, [*starts[1:], n][: len(starts)], strict=True))


class _SeededBatches(Sampler):
    """One `randperm(n, generator)` per epoch, cut by `batch_bounds`: the in-memory path's
    batches (torch's RandomSampler draws a second permutation per epoch, so it would drift
    from it)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator
        self.bounds = batch_bounds(n, batch_size)

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the permutation is drawn when the first batch is asked for, not when
        # the DataLoader merely creates an iterator (it does so more than once per epoch).
        order = torch.randperm(self.n, generator=self.generator).tolist()
        yield from (order[a:b] for a, b in self.bounds)


def _batches(data: ImageSet | Dataset, batch_size: int, shuffle: torch.Generator,
             device: torch.device, loader_workers: int) -> Callable[[], Iterator]:
    """One epoch's (x, y) batches on `device`, in the order `randperm(shuffle)` draws."""
    cuda = device.type == "cuda"  # pinned host memory: an asynchronous copy to the GPU
    if isinstance(data, ImageSet):
        x_all, y_all = ((t.pin_memory() if cuda and not t.is_cuda else t)
                        .to(device, non_blocking=cuda) for t in (data.x, data.y))

        def in_memory():
            order = torch.randperm(len(data), generator=shuffle).to(device)
            for a, b in batch_bounds(len(order), batch_size):
                idx = order[a:b]
                yield x_all[idx], y_all[idx]

        return in_memory
    loader = DataLoader(data, batch_sampler=_SeededBatches(len(data), batch_size, shuffle),
                        num_workers=loader_workers, pin_memory=cuda,
                        persistent_workers=loader_workers > 0)

    def from_loader():
        for x, y in loader:
            yield x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)

    return from_loader


def fit(
    model: nn.Module,
    data: ImageSet | Dataset,
    cfg: TrainConfig,
    objective: Objective = natural_loss,
    on_epoch: Callable[[nn.Module, int], dict] | None = None,
    monitor: Callable[[nn.Module, int], dict] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp: bool | None = None,
    loader_workers: int = 0,
) -> list[dict]:
    """Train the parameters of `model` that require grad to minimise `objective`; return one
    record per epoch.

    Each record has `epoch`, `train_loss` (mean over the epoch's examples), `epoch_lr`,
    `epoch_seconds` (wall time of the epoch's training steps, without `on_epoch` and
    `monitor`), `passes` (passes over the data so far), plus whatever `on_epoch(model, epoch)`
    and `monitor(model, epoch)` return. A monitor whose `stop` attribute turns true ends
    training after that epoch (`train.overfit.OverfitMonitor`). Frozen blocks keep BatchNorm
    in eval mode throughout. Leaves the model in eval mode.

    An objective with `replays = m` (free AT) takes m steps on each minibatch; an epoch is
    then a sweep of m passes, and the loop runs ceil(cfg.epochs / m) sweeps, so `cfg.epochs`
    counts passes over the data and the cost matches that many natural epochs. The LR
    schedule counts passes too (a sweep uses the LR of the pass it starts at).

    `augment(x)` (e.g. `data.augment.RandomCropFlip`) transforms each training batch on the
    device before the objective sees it. `amp`: bf16 autocast (None: on CUDA only).
    `data` is an in-memory `ImageSet`, or any map-style dataset of (image, label) too big for
    one tensor (e.g. `data.lazy.LazyImageFolder`), then read by a `DataLoader` with
    `loader_workers` worker processes; both see the same seeded order, so the same images
    give the same numbers either way.
    """
    device = next(model.parameters()).device
    channels_last = use_channels_last(model, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    replays = int(getattr(objective, "replays", 1))
    sweeps = math.ceil(cfg.epochs / replays)
    schedule = _scheduler(opt, cfg)  # over passes: stepped `replays` times per sweep
    shuffle = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(data, cfg.batch_size, shuffle, device, loader_workers)
    history = []
    for epoch in range(1, sweeps + 1):
        start = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        total = torch.zeros((), device=device)
        set_train_mode(model)  # attacks restore every module's flag, so once per epoch
        for x, y in batches():
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
            total += loss.detach().float() * len(y)
        for _ in range(replays):
            schedule.step()
        model.eval()
        record = {"epoch": epoch, "train_loss": total.item() / len(data), "epoch_lr": lr,
                  "epoch_seconds": time.perf_counter() - start, "passes": epoch * replays}
        if on_epoch is not None:
            record.update(on_epoch(model, epoch))
        if monitor is not None:
            record.update(monitor(model, epoch))
        history.append(record)
        if monitor is not None and getattr(monitor, "stop", False):
            break
    model.eval()
    return history
