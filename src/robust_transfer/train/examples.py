"""Example makers: what the training loop feeds the model for a clean batch (x, y).

Natural training feeds x; PGD adversarial training (Madry et al. 2018) feeds the PGD
adversarial example of x under the training threat model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from robust_transfer.attacks import PGD

ExampleMaker = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def natural_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x


class PGDExamples:
    """PGD-AT inputs: `steps`-step PGD at radius `eps`, step `alpha` (None: 2.5*eps/steps).

    `steps=1, alpha=1.25*eps` is fast FGSM-RS (Wong et al. 2020, arXiv 2001.03994): one FGSM
    step from a uniform random start; `random_start=False` starts from x itself. `mode`: the
    model's mode while the attack runs (`Attack.set_mode`: "eval", or "train" = as the loop
    has it).

    PGD's random starts are keyed by (seed, image content), so one seed would give an image
    the same start every epoch; each call therefore uses its own seed, derived from `seed`
    and the call count (fresh starts every batch, the same sequence for the same seed).
    """

    def __init__(
        self, eps: float, norm: str, steps: int = 7, alpha: float | None = None, seed: int = 0,
        random_start: bool = True, mode: str = "eval",
    ) -> None:
        self.eps, self.norm, self.steps, self.alpha, self.seed = eps, norm, steps, alpha, seed
        self.random_start, self.mode = random_start, mode
        self.calls = 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seed = self.seed * 2**32 + self.calls  # distinct per (seed, call); ExampleRNG mixes it
        self.calls += 1
        attack = PGD(model, self.eps, self.alpha, self.steps, self.norm,
                     random_start=self.random_start, seed=seed)
        return attack.set_mode(self.mode)(x, y)
