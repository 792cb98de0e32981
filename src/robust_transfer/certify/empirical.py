"""The attack's side of a certificate: PGD-L2 with EOT on the smoothed soft classifier.

A certificate is a lower bound on the smoothed classifier's robust accuracy; an attack gives
an upper bound. Following Salman et al. 2019 (arXiv 1906.04584, "Provably Robust Deep Learning
via Adversarially Trained Smoothed Classifiers", Sec. 3), the attack ascends the cross-entropy
of the smoothed *soft* classifier G(x) = E_delta[softmax(f(x + delta))], estimated with m noise
draws per forward pass (`SmoothedSoft`), and further averaged over `eot_samples` passes per
gradient (EOT, `Attack.set_adaptive`). The attacked images are then classified by the
smoothed classifier g, estimated by the majority class of n noise draws (`Smooth.counts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robust_transfer.attacks.gradient import PGD
from robust_transfer.certify.smooth import Smooth
from robust_transfer.data.augment import GaussianNoise


class SmoothedSoft(nn.Module):
    """log G(x): the log of the mean softmax of `model` over `m` Gaussian noise draws.

    As "logits" it gives the soft classifier's class, and cross-entropy on it is Salman et
    al.'s -log((1/m) sum_i softmax(f(x + delta_i))_y). Noise comes from the module's own
    seeded generator (`data.augment.GaussianNoise`, unclipped): every forward pass, and every
    copy of an image within one pass, draws fresh noise, as EOT needs; `reseed` restarts the
    sequence.

    Shape: x (N, C, H, W) in [0,1] -> (N, num_classes) log-probabilities.

    Example:
        soft = SmoothedSoft(model, sigma=0.25, m=8)
        x_adv = PGD(soft, eps=0.5, norm="l2", steps=20).set_adaptive(eot_samples=4)(x, y)
    """

    randomized = True

    def __init__(self, model: nn.Module, sigma: float, m: int = 8, seed: int = 0) -> None:
        super().__init__()
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be an integer >= 1, got {m!r}")
        self.model, self.m = model, m
        self.noise = GaussianNoise(sigma, seed)
        self.sigma = self.noise.sigma

    def reseed(self, seed: int) -> None:
        self.noise = GaussianNoise(self.sigma, seed)

    @property
    def spec(self):
        return self.model.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = self.noise.sample((self.m, *x.shape), x)  # already scaled by sigma
        logits = self.model((x.unsqueeze(0) + noise).flatten(0, 1))
        probs = logits.float().softmax(1).view(self.m, len(x), -1).mean(0)
        return probs.clamp_min(1e-12).log()


def empirical_robust_accuracy(smooth: Smooth, x: torch.Tensor, y: torch.Tensor,
                              radii: Sequence[float], n: int = 1000, m: int = 8,
                              eot_samples: int = 4, steps: int = 20, seed: int = 0,
                              batch_size: int = 1000) -> list[float]:
    """Per radius r: the fraction of images whose PGD-L2 adversarial example within r (20
    steps of 2.5 r / steps, random start; EOT over m x eot_samples noise draws per gradient)
    the smoothed classifier g (majority of n draws) still classifies as y. r = 0: g's clean
    accuracy. An upper bound on g's robust accuracy, up to the Monte Carlo error of g."""
    device = next(smooth.model.parameters()).device
    x, y = x.to(device), y.to(device)
    soft = SmoothedSoft(smooth.model, smooth.sigma, m, seed)
    chunk = max(1, batch_size // (m * eot_samples))
    out = []
    for r in radii:
        if r > 0:
            soft.reseed(seed)
            attack = PGD(soft, eps=float(r), norm="l2", steps=steps, seed=seed)
            attack.set_adaptive(eot_samples=eot_samples)
            x_adv = torch.cat([attack(x[i:i + chunk], y[i:i + chunk])
                               for i in range(0, len(x), chunk)]) if len(x) else x
        else:
            x_adv = x
        pred = smooth.counts(x_adv, n, batch_size, seed).argmax(1)
        out.append((pred == y.to(pred.device)).double().mean().item() if len(y)
                   else float("nan"))
    return out
