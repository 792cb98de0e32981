"""Adversarial-training methods as objectives of the one loop (`train.loop.fit`).

- `natural`: CE(x).
- `pgd`: Madry et al. 2018 (arXiv 1706.06083), CE on PGD examples (`PGDExamples`).
- `fgsm`: Goodfellow et al. 2015 (arXiv 1412.6572), a*CE(x) + (1-a)*CE(x_fgsm), a = 0.5.
- `fast`: Wong et al. 2020 (arXiv 2001.03994), CE on FGSM from a uniform random start with
  step 1.25*eps (catastrophic overfitting is watched by `train.overfit.OverfitMonitor`).
- `free`: Shafahi et al. 2019 (arXiv 1904.12843), `FreeLoss`: each minibatch replayed m times,
  one backward pass per replay giving both the weight gradient and the perturbation's.
- `trades`: Zhang et al. 2019 (arXiv 1901.08573), `TRADESLoss`: CE(x) + beta*KL(f(x)||f(x')).
- `gaussian`: Cohen et al. 2019 (arXiv 1902.02918), CE on x + N(0, sigma^2 I): training for
  randomized smoothing, not adversarial (eps 0); `train.smoothing.GaussianExamples`.
- `smoothadv`: Salman et al. 2019 (arXiv 1906.04584), SmoothAdv-PGD: PGD-L2 on the smoothed
  soft classifier's CE with m noise draws, then CE on the m noisy copies of x'
  (`train.smoothing.SmoothAdvLoss`).

Every perturbation comes from the attacks layer (its attacks and `ThreatModel`s), so every
example a method trains on lies in the threat model's ball and in [0,1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.attacks import FGSM, KLPGD, make_threat
from robust_transfer.train.examples import PGDExamples
from robust_transfer.train.objectives import ExampleLoss, Objective, natural_loss
from robust_transfer.train.smoothing import (
    SIGMA,
    SMOOTHADV_SAMPLES,
    GaussianExamples,
    SmoothAdvLoss,
)

METHODS = ("natural", "pgd", "fgsm", "fast", "free", "trades", "gaussian", "smoothadv")
# Methods with an adversary: they need eps > 0 (natural and gaussian take eps 0).
ROBUST_METHODS = ("pgd", "fgsm", "fast", "free", "trades", "smoothadv")
# Methods that add Gaussian noise of level `sigma` (randomized smoothing).
NOISE_METHODS = ("gaussian", "smoothadv")
FGSM_CLEAN_WEIGHT = 0.5  # Goodfellow et al.'s a
FAST_STEP = 1.25  # Wong et al.'s FGSM-RS step, as a multiple of eps
TRADES_BETA = 6.0  # Zhang et al.'s default for CIFAR-10
FREE_REPLAYS = 8  # Shafahi et al.'s m for CIFAR-10


class FGSMLoss:
    """Goodfellow et al. 2015's FGSM adversarial training: a*CE(x) + (1-a)*CE(x_fgsm).

    x_fgsm is one step of size eps from x itself (`attacks.FGSM`, no random start).

    Shape: x (N, C, H, W) in [0,1], y (N,) -> scalar loss.

    Example:
        loss = FGSMLoss(eps=0.1, norm="linf")(model, x, y)
    """

    def __init__(self, eps: float, norm: str, clean_weight: float = FGSM_CLEAN_WEIGHT) -> None:
        self.eps, self.norm, self.clean_weight = eps, norm, clean_weight

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = FGSM(model, self.eps, self.norm)(x, y)
        a = self.clean_weight
        return a * F.cross_entropy(model(x), y) + (1 - a) * F.cross_entropy(model(x_adv), y)


class FreeLoss:
    """Free adversarial training (Shafahi et al. 2019, "Adversarial Training for Free!").

    The loop replays each minibatch `replays` (m) times (it honours `replays`). Each replay is
    one forward and one backward pass at x + delta; that backward pass gives the weight
    gradient (the loop's optimiser step) and the input gradient, with which delta takes one
    ascent step of size eps (`ThreatModel.step`, then `project` into the ball and [0,1]). delta
    is warm: kept across replays and carried on to the next minibatch (and epoch), starting at
    zero. The step is applied lazily, at the next call, once the loop's backward has filled
    the input's gradient.

    Cost: a replay costs what one natural step costs. With `TrainConfig.epochs` = E, the loop
    sweeps the data ceil(E/m) times, each minibatch m times in a row, so E counts passes over
    the data (m per sweep) and the number of forward-backward passes is that of E natural
    epochs (exactly when m divides E).

    Shape: x (N, C, H, W) in [0,1], y (N,) -> scalar loss.

    Example:
        fit(model, data, TrainConfig(epochs=8), FreeLoss(eps=0.1, norm="linf", replays=4))
    """

    def __init__(self, eps: float, norm: str, replays: int = FREE_REPLAYS) -> None:
        self.threat = make_threat(norm, eps)
        self.replays = int(replays)
        self.delta: torch.Tensor | None = None  # (batch, C, H, W), the warm perturbation
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (x_adv leaf, x)

    def _ascend(self) -> None:
        """delta <- project(x_adv + eps * step direction) - x, from the last backward pass."""
        if self._last is None or self._last[0].grad is None:
            return
        x_adv, x = self._last
        moved = self.threat.project(self.threat.step(x_adv.detach(), x_adv.grad,
                                                     self.threat.eps), x)
        self.delta[: len(x)] = moved - x
        self._last = None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._ascend()
        if self.delta is None or len(self.delta) < len(x) or self.delta.shape[1:] != x.shape[1:]:
            grown = torch.zeros_like(x)
            if self.delta is not None and self.delta.shape[1:] == x.shape[1:]:
                grown[: len(self.delta)] = self.delta
            self.delta = grown
        # A smaller (last) batch takes the first rows; delta carries on to the next batch.
        x_adv = self.threat.project(x + self.delta[: len(x)], x).requires_grad_(True)
        self._last = (x_adv, x)
        return F.cross_entropy(model(x_adv), y)


class TRADESLoss:
    """TRADES (Zhang et al. 2019, arXiv 1901.08573): CE(f(x), y) + beta * KL(f(x) || f(x')).

    x' maximises the KL within the threat model (`attacks.KLPGD`: `steps` PGD steps of size
    `alpha`, None: 2.5*eps/steps, from a random start), in eval mode as TRADES' code does;
    both forward passes of the loss run in train mode and the gradient flows through both
    (TRADES' Alg. 1). KL is summed over classes and averaged over the batch ("batchmean").
    beta = 0 is natural training: the KL term and its attack are skipped, so the weights (and
    BatchNorm statistics) are exactly those of natural training with the same seed.

    Shape: x (N, C, H, W) in [0,1], y (N,) -> scalar loss.

    Example:
        loss = TRADESLoss(eps=0.1, norm="linf", beta=6.0)(model, x, y)
    """

    def __init__(self, eps: float, norm: str, beta: float = TRADES_BETA, steps: int = 7,
                 alpha: float | None = None, seed: int = 0) -> None:
        self.eps, self.norm, self.beta, self.steps, self.alpha = eps, norm, beta, steps, alpha
        self.seed = seed
        self.calls = 0

    def adversarial(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x' for this call (fresh random starts each call, as `PGDExamples`)."""
        seed = self.seed * 2**32 + self.calls
        self.calls += 1
        unused_labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return KLPGD(model, self.eps, self.alpha, self.steps, self.norm, seed=seed)(
            x, unused_labels)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.beta == 0:
            return F.cross_entropy(model(x), y)
        x_adv = self.adversarial(model, x)
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.log_softmax(logits, dim=1),
                      reduction="batchmean", log_target=True)
        return F.cross_entropy(logits, y) + self.beta * kl


def make_objective(method: str, eps: float, norm: str, steps: int = 7,
                   alpha: float | None = None, seed: int = 0, trades_beta: float = TRADES_BETA,
                   free_replays: int = FREE_REPLAYS, sigma: float = SIGMA,
                   noise_samples: int = SMOOTHADV_SAMPLES) -> Objective:
    """The objective of `method` (one of `METHODS`) at threat model (norm, eps). `steps` and
    `alpha` are the PGD settings of `pgd`, `trades` and `smoothadv`; `sigma` the noise level
    of `gaussian` and `smoothadv`, `noise_samples` smoothadv's m."""
    if method == "natural":
        return natural_loss
    if method == "pgd":
        return ExampleLoss(PGDExamples(eps, norm, steps, alpha, seed))
    if method == "fgsm":
        return FGSMLoss(eps, norm)
    if method == "fast":
        return ExampleLoss(PGDExamples(eps, norm, 1, FAST_STEP * eps, seed))
    if method == "free":
        return FreeLoss(eps, norm, free_replays)
    if method == "trades":
        return TRADESLoss(eps, norm, trades_beta, steps, alpha, seed)
    if method == "gaussian":
        return ExampleLoss(GaussianExamples(sigma, seed))
    if method == "smoothadv":  # L2 only (SourceConfig checks the norm)
        return SmoothAdvLoss(eps, sigma, steps, alpha, noise_samples, seed)
    raise ValueError(f"unknown method {method!r}")  # SourceConfig checks names first
