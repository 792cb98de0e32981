"""Catastrophic-overfitting detection for single-step adversarial training.

Wong et al. 2020 ("Fast is better than free", arXiv 2001.03994, Sec. 5) found that FGSM
training can suddenly lose all robustness to PGD within an epoch while its accuracy against
FGSM itself keeps rising: the model learns to mask the one-step attack. They watch PGD
accuracy on a minibatch and stop early. `OverfitMonitor` does that after every epoch on a
fixed batch held out of training (`hold_out`), through the one evaluation path.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

from robust_transfer.attacks import FGSM, PGD, evaluate
from robust_transfer.data import ImageSet

ACTIONS = ("off", "warn", "stop", "rollback")
MONITOR_SIZE = 64  # held-out examples (at most a tenth of the training set)
MONITOR_PGD_STEPS = 10
# A collapse: PGD accuracy falls below half its previous value, by at least this much (so
# that one or two examples of a small batch near 0 are not a collapse), while FGSM rises.
MIN_DROP = 0.1


class CatastrophicOverfittingWarning(UserWarning):
    """PGD accuracy on the held-out batch collapsed while FGSM accuracy rose."""


def hold_out(data: ImageSet, seed: int, size: int = MONITOR_SIZE) -> tuple[ImageSet, ImageSet]:
    """(training set without the held-out batch, the held-out batch): `min(size, n // 10)`
    examples drawn with `seed`, never trained on."""
    n = len(data)
    k = max(1, min(size, n // 10))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[k:].sort().values), data.subset(order[:k].sort().values)


class OverfitMonitor:
    """After each epoch, PGD and FGSM accuracy on a fixed held-out batch; flags a collapse.

    Collapse at epoch t (Wong et al. 2020): pgd_t < pgd_{t-1} / 2, pgd_{t-1} - pgd_t >=
    `MIN_DROP`, and fgsm_t > fgsm_{t-1}. On a collapse it warns
    (`CatastrophicOverfittingWarning`) and, per `action`: "warn" trains on; "stop" ends
    training there (the weights of the collapsed epoch stay); "rollback" ends training and
    restores the weights of the last good epoch (the one before the first collapse). The loop
    reads `stop`. Records per epoch: `monitor_pgd_accuracy`, `monitor_fgsm_accuracy`,
    `catastrophic_overfit` (this epoch collapsed), `monitor_seconds`.

    Shape: x (N, C, H, W) in [0,1], y (N,) — the held-out batch.

    Example:
        monitor = OverfitMonitor(held.x, held.y, eps=0.1, norm="linf", action="rollback")
        fit(model, train, cfg, objective, monitor=monitor)
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
                 action: str = "warn", pgd_steps: int = MONITOR_PGD_STEPS, seed: int = 0
                 ) -> None:
        self.x, self.y, self.eps, self.norm, self.action = x, y, eps, norm, action
        self.pgd_steps, self.seed = pgd_steps, seed
        self.stop = False
        self.previous: tuple[float, float] | None = None
        self.collapsed_epochs: list[int] = []
        self.last_good_epoch = 0
        self.rolled_back = False
        self._good_state: dict | None = None

    def _accuracy(self, model: nn.Module, attack) -> float:
        table = evaluate(model, self.x, self.y, [attack], [self.eps], self.norm, check=False)
        return float(table[table.attack == "worst case"].robust_accuracy.iloc[0])

    def __call__(self, model: nn.Module, epoch: int) -> dict:
        start = time.perf_counter()
        pgd = self._accuracy(model, lambda m, e: PGD(m, e, steps=self.pgd_steps,
                                                     norm=self.norm, seed=self.seed))
        fgsm = self._accuracy(model, lambda m, e: FGSM(m, e, self.norm))
        collapsed = self.previous is not None and (
            pgd < self.previous[0] / 2 and self.previous[0] - pgd >= MIN_DROP
            and fgsm > self.previous[1])
        self.previous = (pgd, fgsm)
        if collapsed:
            self.collapsed_epochs.append(epoch)
            warnings.warn(CatastrophicOverfittingWarning(
                f"catastrophic overfitting at epoch {epoch}: held-out PGD accuracy fell to "
                f"{pgd:.3f} while FGSM accuracy rose to {fgsm:.3f}; last good epoch "
                f"{self.last_good_epoch} (on-overfit: {self.action})"), stacklevel=2)
            if self.action in ("stop", "rollback"):
                self.stop = True
            if self.action == "rollback" and self._good_state is not None:
                model.load_state_dict(self._good_state)
                self.rolled_back = True
        elif not self.collapsed_epochs:
            self.last_good_epoch = epoch
            if self.action == "rollback":
                self._good_state = copy.deepcopy(model.state_dict())
        return {"monitor_pgd_accuracy": pgd, "monitor_fgsm_accuracy": fgsm,
                "catastrophic_overfit": collapsed,
                "monitor_seconds": time.perf_counter() - start}

    def summary(self) -> dict:
        """What happened, for the checkpoint's metrics."""
        return {"on_overfit": self.action, "catastrophic_overfit_epochs": self.collapsed_epochs,
                "last_good_epoch": self.last_good_epoch, "rolled_back": self.rolled_back,
                "monitor_size": len(self.y)}
