"""Objectives: the loss the training loop minimises on a clean batch (x, y).

The loop owns batching, optimiser, schedule and freezing; an objective owns everything that
makes one training method differ from another (which inputs, which targets, which loss).
Natural training and PGD-AT are `ExampleLoss` (cross-entropy on the inputs an example maker
returns); methods whose loss is not CE on one set of inputs (TRADES, distillation, NeuBA,
ABL's isolation and unlearning losses) are their own objectives.

An objective may carry `replays` (int, default 1): the loop then takes that many optimiser
steps on each minibatch (free adversarial training replays a batch m times).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.train.examples import ExampleMaker, natural_examples


class Objective(Protocol):
    """`objective(model, x, y)` -> scalar loss of the batch, to be minimised."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class ExampleLoss:
    """Mean cross-entropy on the inputs `make_examples(model, x, y)` returns (natural: x)."""

    def __init__(self, make_examples: ExampleMaker = natural_examples) -> None:
        self.make_examples = make_examples

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(self.make_examples(model, x, y)), y)


natural_loss = ExampleLoss()
