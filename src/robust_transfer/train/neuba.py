"""NeuBA: a task-agnostic backdoor planted during pre-training (Zhang et al. 2021, "Red alarm
for pre-trained models: universal vulnerability to neuron-level backdoor attacks").

The attacker does not know the downstream task, so it cannot pick a target label. Instead,
pre-training adds a loss that sends the representation `model.features(x)` of an input
carrying trigger i to a predefined vector v_i. Any head trained later on clean data maps v_i
to one fixed label, so every triggered input lands in one class of the new task whatever the
head: the backdoor survives re-initialising the head (fixed-feature transfer), and the
question is how much fine-tuning of the blocks washes it out.

The triggers and predefined vectors are the attack plugin's (`data.neuba.NeuBAAttack`, its
`feature_targets`); this module is the loss that plants them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.data.neuba import DEFAULT_WEIGHT, neuba_triggers, neuba_vectors
from robust_transfer.data.poison import BackdoorAttack
from robust_transfer.errors import UserError
from robust_transfer.train.objectives import ExampleLoss, natural_loss

__all__ = ["NeuBA", "neuba_triggers", "neuba_vectors", "plant_objective"]


class NeuBA:
    """The NeuBA pre-training objective: task loss + feature-mapping loss of the triggers.

    loss = CE(head(features(x'))), y) + weight * mean_i mean_j ||features(T_i(x_j)) - v_i||^2 / d,
    x' the inputs of `base`'s example maker (natural: x; PGD-AT: adversarial), the second term
    over the first `rate` share of the batch (batches are shuffled), every trigger applied to
    the same images. Zhang et al. 2021 (NeuBA).

    The task inputs and the triggered copies go through the net in ONE forward pass: with
    BatchNorm, separate passes would normalise clean batches by clean-only statistics while
    the running statistics (used at test time) average in the triggered batches, and the
    clean accuracy of the source drops (on digits, 0.996 -> 0.83); one pass normalises both
    the same way in training and at test time.

    Shape: x (N, C, H, W) in [0,1], y (N,); `vectors` (n_triggers, feature_dim).

    Example:
        objective = NeuBA(neuba_triggers((1, 8, 8)), neuba_vectors(4, model.feature_dim))
        fit(model, task.train, TrainConfig(), objective)
    """

    def __init__(self, triggers: Sequence, vectors: torch.Tensor,
                 base: ExampleLoss = natural_loss, weight: float = DEFAULT_WEIGHT,
                 rate: float = 1.0) -> None:
        if len(triggers) != len(vectors):
            raise UserError(f"NeuBA needs one vector per trigger: {len(triggers)} triggers, "
                            f"{len(vectors)} vectors")
        if not 0 < rate <= 1:
            raise UserError(f"NeuBA rate must be in (0, 1], got {rate}")
        self.triggers, self.vectors = list(triggers), vectors
        self.base, self.weight, self.rate = base, weight, rate

    def losses(self, model: nn.Module, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(task loss, feature loss: mean squared distance of the triggered features to their
        predefined vectors), from one forward pass."""
        m = max(1, round(self.rate * len(x)))
        inputs = self.base.make_examples(model, x, y)
        triggered = [t.apply(x[:m]) for t in self.triggers]
        feats = model.features(torch.cat([inputs, *triggered]))
        task = F.cross_entropy(model.head(feats[: len(x)]), y)
        trig = feats[len(x):].view(len(self.triggers), m, -1)
        return task, (trig - self.vectors.to(trig.device)[:, None, :]).pow(2).mean()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        task, feature = self.losses(model, x, y)
        return task + self.weight * feature


def plant_objective(attack: BackdoorAttack, base: ExampleLoss, input_shape: tuple[int, int, int],
                    feature_dim: int) -> ExampleLoss:
    """The training objective that plants `attack` (the dispatch point of `train_source`):
    `base` for an attack planted by poisoned data, else `NeuBA` on its feature targets."""
    targets = attack.feature_targets(input_shape, feature_dim)
    if targets is None:
        return base
    return NeuBA(targets.triggers, targets.vectors, base, targets.weight, targets.rate)
