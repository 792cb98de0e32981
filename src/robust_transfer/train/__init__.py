"""One training loop with pluggable example makers, optimiser/schedule and freezing."""

from robust_transfer.train.distill import (
    ARDLoss,
    DistillConfig,
    KDLoss,
    SoftLabelLoss,
    TemperatureLoss,
    kd_loss,
)
from robust_transfer.train.examples import ExampleMaker, PGDExamples, natural_examples
from robust_transfer.train.freeze import freeze_all_but_last, frozen_blocks, set_train_mode
from robust_transfer.train.loop import TrainConfig, fit
from robust_transfer.train.objectives import ExampleLoss, Objective, natural_loss
from robust_transfer.train.source import SourceConfig, train_source

__all__ = [
    "ExampleMaker",
    "PGDExamples",
    "natural_examples",
    "ExampleLoss",
    "Objective",
    "natural_loss",
    "freeze_all_but_last",
    "frozen_blocks",
    "set_train_mode",
    "TrainConfig",
    "fit",
    "SourceConfig",
    "train_source",
    "kd_loss",
    "KDLoss",
    "ARDLoss",
    "SoftLabelLoss",
    "TemperatureLoss",
    "DistillConfig",
]
