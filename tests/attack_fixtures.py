"""Shared, cached tiny models and data for the attack tests (imported, not a conftest).

Models are trained once per test session (functools.cache); tests that change a model's
mode or gradients work on a deep copy (`fresh`).
"""

from __future__ import annotations

import copy
from functools import cache

import torch

from robust_transfer.data import load_task
from robust_transfer.train import SourceConfig, TrainConfig, train_source


@cache
def natural_model():
    model, _ = train_source(SourceConfig(task="digits-0to4", eps=0.0,
                                         train=TrainConfig(epochs=4, seed=0)))
    return model.eval()


@cache
def robust_model():
    """PGD-AT, Linf eps=0.1, a few epochs: robust enough that attacks differ."""
    model, _ = train_source(SourceConfig(task="digits-0to4", eps=0.1, norm="linf",
                                         attack_steps=3,
                                         train=TrainConfig(epochs=4, seed=0)))
    return model.eval()


def fresh(model):
    return copy.deepcopy(model)


def digits_batch(n: int = 64, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_task("digits-0to4").test
    return test.x[offset:offset + n].clone(), test.y[offset:offset + n].clone()
