"""Anti-Backdoor Learning (ABL; Li et al. 2021, "Anti-backdoor learning: training clean models
on poisoned data", NeurIPS): a training-time defense in three phases, each one `train.fit`
with its own objective.

1. Isolation: train on the poisoned set with the local gradient ascent loss (LGA)
   sign(L - gamma) * L (gamma = 0.5), or flooding |L - b| + b. Both stop pushing the loss of
   a batch below gamma (b), so clean examples stay near it, while backdoor examples — learnt
   far faster, the paper's key observation — still fall below it. Then isolate the 1% of
   training examples with the lowest loss.
2. Train on the rest (cross-entropy), from the isolation model.
3. Unlearn: gradient ascent on the isolated examples (minimise -CE; 5 epochs, lr 5e-4), which
   breaks the link between trigger and target for every poisoned example, isolated or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.data import ImageSet
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import predict_logits
from robust_transfer.plugins import option
from robust_transfer.train import TrainConfig, fit

ISOLATION_LOSSES = ("lga", "flooding")


class LGALoss:
    """ABL's local gradient ascent loss sign(L - gamma) * L on the batch's mean CE L."""

    def __init__(self, gamma: float = 0.5) -> None:
        self.gamma = gamma

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        return torch.sign(loss - self.gamma) * loss


class FloodingLoss:
    """Flooding (Ishida et al. 2020) |L - b| + b: ascends once the batch loss is below b."""

    def __init__(self, flood: float = 0.5) -> None:
        self.flood = flood

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(model(x), y) - self.flood).abs() + self.flood


class GradientAscent:
    """-CE: minimising it ascends the loss of the batch (ABL's unlearning)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(model(x), y)


@dataclass(frozen=True)
class ABLConfig:
    """ABL's settings: isolation loss and epochs, gamma (LGA) or flood level, the share of
    examples to isolate, epochs on the rest, and unlearning epochs and learning rate."""

    loss: str = option("lga", "isolation loss: lga | flooding")
    gamma: float = option(0.5, "LGA's gamma (flooding: the flood level)")
    isolation_epochs: int = option(10, "epochs of the isolation phase")
    isolate: float = option(0.01, "share of the training set isolated (lowest loss)")
    rest_epochs: int = option(20, "epochs on the rest, from the isolation model")
    unlearn_epochs: int = option(5, "epochs of gradient ascent on the isolated examples")
    unlearn_lr: float = option(5e-4, "learning rate of unlearning")

    def __post_init__(self) -> None:
        check_choice("ABL isolation loss", self.loss, ISOLATION_LOSSES)
        if not 0 < self.isolate < 1 or self.gamma <= 0:
            raise UserError(f"ABL needs 0 < isolate < 1 and gamma > 0, got {self.isolate}, "
                            f"{self.gamma}")
        if min(self.isolation_epochs, self.unlearn_epochs) < 1 or self.rest_epochs < 0:
            raise UserError("ABL epochs must be >= 1 (rest epochs >= 0)")


def example_losses(model: nn.Module, data: ImageSet) -> torch.Tensor:
    """Per-example cross-entropy of `model` on `data`, in eval mode, batched."""
    return F.cross_entropy(predict_logits(model, data.x), data.y, reduction="none")


def isolate(model: nn.Module, data: ImageSet, share: float) -> torch.Tensor:
    """Sorted indices of the `share` of `data` (at least one) with the lowest loss."""
    k = max(1, round(share * len(data)))
    return torch.argsort(example_losses(model, data), stable=True)[:k].sort().values


def anti_backdoor_learning(model: nn.Module, data: ImageSet, train: TrainConfig,
                           cfg: ABLConfig = ABLConfig()) -> tuple[nn.Module, torch.Tensor]:
    """Train freshly initialised `model` on the poisoned set `data` with ABL (module docstring);
    return (the model, the isolated indices). `train` gives the optimiser of phases 1-2."""
    objective = LGALoss(cfg.gamma) if cfg.loss == "lga" else FloodingLoss(cfg.gamma)
    fit(model, data, TrainConfig(**{**train.to_dict(), "epochs": cfg.isolation_epochs,
                                    "schedule": "constant"}), objective)
    isolated = isolate(model, data, cfg.isolate)
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[isolated] = False
    if cfg.rest_epochs:
        fit(model, data.subset(torch.nonzero(rest).flatten()),
            TrainConfig(**{**train.to_dict(), "epochs": cfg.rest_epochs}))
    unlearn = TrainConfig(epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr, schedule="constant",
                          batch_size=train.batch_size, seed=train.seed)
    fit(model, data.subset(isolated), unlearn, GradientAscent())
    return model, isolated
