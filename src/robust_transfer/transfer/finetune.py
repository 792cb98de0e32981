"""The fine-tuning protocol of arXiv 2007.05869 (Utrera et al., "Adversarially-trained deep
nets transfer better"): re-initialise the head for the target classes, unfreeze only the last
k blocks, train on n images per class, record test accuracy after every epoch.

This module is the protocol and its per-run reference (`finetune_per_run`); which engine
trains a fine-tune (this one or a batched one) is chosen in `transfer.engines`, whose
`finetune` is the entry point (`robust_transfer.transfer.finetune`, the package's export).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from numbers import Integral

import torch
from torch import nn

from robust_transfer.data import ImageSet, adapt_images, check_task, load_task, shots_per_class
from robust_transfer.data.augment import GaussianNoise, RandomCropFlip, check_sigma, mirror_safe
from robust_transfer.data.tasks import IMAGEFOLDER, TASKS, Shots, parse_shots
from robust_transfer.errors import UserError
from robust_transfer.models.nets import BlockNet
from robust_transfer.models.runtime import accuracy
from robust_transfer.train import TrainConfig, fit, freeze_all_but_last
from robust_transfer.variables import omit_defaults, variable


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
    keeps from the spec to the results table); `unfrozen_blocks` None means all blocks.
    `augment`: random crop with padding, plus horizontal flips where the target's images
    allow them (`data.augment`); off by default (the paper's few-shot protocol has none).
    `noise_sigma` > 0: Gaussian noise N(0, noise_sigma^2 I) added to every training batch
    (after any crop; unclipped, seeded by `seed`), so that a smoothed classifier of that
    noise level can be certified after transfer (Cohen et al. 2019); 0 = none."""

    # Each field declared once (`robust_transfer.variables`): the engines that implement it,
    # whether it is a report facet, whether it enters run ids at its default.
    target_task: str = variable("digits-5to9", role="finetune", facet=1)
    images_per_class: Shots = variable(5, role="finetune")
    unfrozen_blocks: int | None = variable(0, role="finetune")
    epochs: int = variable(30, role="finetune", facet=3)
    lr: float = variable(0.1, role="finetune", facet=2)
    batch_size: int = variable(32, role="finetune", facet=4)
    seed: int = variable(0, role="finetune")
    augment: bool = variable(False, role="finetune", engines=("stacked",), facet=5,
                             id_at_default=False, grid="one")
    noise_sigma: float = variable(0.0, role="finetune", engines=(), facet=6,
                                  label="noise σ", id_at_default=False, grid="crossed")

    def __post_init__(self) -> None:
        check_task(self.target_task)
        object.__setattr__(self, "noise_sigma",
                           check_sigma(self.noise_sigma, "noise sigma", allow_zero=True))
        object.__setattr__(self, "images_per_class", parse_shots(self.images_per_class))
        object.__setattr__(self, "unfrozen_blocks", parse_blocks(self.unfrozen_blocks))
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral) or self.seed < 0:
            raise UserError(f"fine-tuning seed must be an integer >= 0, got {self.seed!r}")
        self.train_config()  # epochs, lr, batch size: checked now, not after sources train

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
            schedule="step",
        )

    def to_dict(self) -> dict:
        """The config as recorded (and hashed into run ids); variables declared
        `id_at_default=False` (`augment`, `noise_sigma`) only when set, so the runs of specs
        without them keep their ids."""
        return omit_defaults(self, asdict(self))


def augmentation(cfg: FinetuneConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The training augmentation `cfg` asks for, seeded by the fine-tune's seed: with
    `augment`, crops always and flips where the target's data set is mirror-safe; with
    `noise_sigma`, Gaussian noise (after the crop); None when neither."""
    crop = None
    if cfg.augment:
        name = cfg.target_task
        dataset = "imagefolder" if name.startswith(IMAGEFOLDER) else TASKS[name][0]
        crop = RandomCropFlip(flip=mirror_safe(dataset), seed=cfg.seed)
    if not cfg.noise_sigma:
        return crop
    noise = GaussianNoise(cfg.noise_sigma, cfg.seed)
    return noise if crop is None else (lambda x: noise(crop(x)))


def finetune_per_run(model: BlockNet, cfg: FinetuneConfig, amp: bool | None = None,
                     on_epoch: Callable[[nn.Module, int], dict] | None = None,
                     train_transform: Callable[[ImageSet], ImageSet] | None = None
                     ) -> list[dict]:
    """The reference: one fine-tune through `train.fit`; one record per epoch.

    The same seed draws the same k-shot subset and the same new head whichever source is
    being fine-tuned, so natural and robust sources are compared on identical data.
    Target images are adapted to the source (`adapt_images`): grey images repeated to the
    model's channels, and resized to its recorded input size when it has one.
    Records: epoch, train_loss, epoch_lr, train_images, test_accuracy, plus whatever
    `on_epoch(model, epoch)` returns (e.g. a backdoor's ASR on the target test set).
    `amp`: bf16 autocast for training and test accuracy (None: on CUDA only).
    `train_transform`: applied once to the adapted k-shot training set (the images the model
    is trained on; the test set is left alone); it must keep the set's size and labels.
    """
    task = load_task(cfg.target_task)
    spec = model.spec
    what = f"target task {cfg.target_task!r} images"
    train = task.train.subset(shots_per_class(task.train.y, cfg.images_per_class, cfg.seed))
    train = adapt_images(train, spec.in_channels, spec.input_size, what)
    test = adapt_images(task.test, spec.in_channels, spec.input_size, what)
    if train_transform is not None:
        changed = train_transform(train)
        if len(changed) != len(train) or not torch.equal(changed.y, train.y):
            raise UserError("a fine-tuning train_transform must keep the training set's "
                            "images and labels (it may only change pixels)")
        train = changed
    device = next(model.parameters()).device
    model.reset_head(task.num_classes, torch.Generator().manual_seed(cfg.seed))
    freeze_all_but_last(model, cfg.unfrozen_blocks)
    test_x, test_y = test.x.to(device), test.y.to(device)

    def test_accuracy(m, epoch):
        record = {"train_images": len(train),
                  "test_accuracy": accuracy(m, test_x, test_y, amp=amp)}
        return record if on_epoch is None else {**record, **on_epoch(m, epoch)}

    history = fit(model, train, cfg.train_config(), on_epoch=test_accuracy,
                  augment=augmentation(cfg), amp=amp)
    # Wall time is not a result: the same run must give the same rows (resume, dedup).
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "passes")}
            for r in history]
