"""Training for randomized smoothing: Gaussian data augmentation and SmoothAdv.

- `gaussian` (Cohen, Rosenfeld & Kolter 2019, arXiv 1902.02918): CE on x + N(0, sigma^2 I)
  (`GaussianExamples`), so that the base classifier f is accurate under the noise the
  smoothed classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I), adds.
- `smoothadv` (Salman et al. 2019, "Provably Robust Deep Learning via Adversarially Trained
  Smoothed Classifiers", arXiv 1906.04584), SmoothAdv-PGD (`SmoothAdvLoss`): adversarial
  training of the smoothed soft classifier G(x) = E_delta[softmax(f(x + delta))].

Noise is never clipped to [0,1] (the smoothed classifier's definition; `data.augment.
GaussianNoise`); adversarial points are, through the attacks layer's L2 `ThreatModel`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.attacks import make_threat
from robust_transfer.data.augment import GaussianNoise
from robust_transfer.models.runtime import accuracy, eval_mode

SIGMA = 0.25  # Cohen et al.'s middle noise level (of 0.12, 0.25, 0.5, 1.0)
# Salman et al.'s train_pgd.py defaults: --num-noise-vec 1 (m), step 2*eps/steps, PGD from
# x itself (no random start), --warmup 1 (no eps ramp). Their --num-steps default is 10; here
# the recipe's `attack_steps` (7 by default, PGD-AT's; their published models use 2-10).
SMOOTHADV_SAMPLES = 1
SMOOTHADV_STEP = 2.0  # step size as a multiple of eps / steps


class GaussianExamples:
    """Example maker of Gaussian data augmentation (Cohen et al. 2019): x + N(0, sigma^2 I),
    not clipped, from a generator seeded by `seed` (`data.augment.GaussianNoise`).

    Shape: x (N, C, H, W) in [0,1] -> (N, C, H, W).

    Example:
        loss = ExampleLoss(GaussianExamples(sigma=0.25, seed=0))(model, x, y)
    """

    def __init__(self, sigma: float, seed: int = 0) -> None:
        self.noise = GaussianNoise(sigma, seed)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.noise(x)


def smoothed_cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           noise: torch.Tensor) -> torch.Tensor:
    """Per-example CE of the smoothed soft classifier, estimated with m noise draws:
    -log((1/m) sum_i softmax(f(x + noise_i))_y), computed as a logsumexp of log-softmaxes
    (Salman et al.'s code clamps the mean softmax at 1e-20 instead; same value where that
    clamp does not bind).

    Shape: x (N, C, H, W), y (N,), noise (m, N, C, H, W) -> (N,).
    """
    m, n = noise.shape[:2]
    logits = model((x.unsqueeze(0) + noise).flatten(0, 1))
    logp = F.log_softmax(logits.float(), dim=1).view(m, n, -1)
    logp_y = logp.gather(2, y.view(1, n, 1).expand(m, n, 1)).squeeze(2)  # (m, N)
    return math.log(m) - torch.logsumexp(logp_y, dim=0)


class SmoothAdvLoss:
    """SmoothAdv-PGD (Salman et al. 2019, arXiv 1906.04584; Hadisalman/smoothing-adversarial
    `train_pgd.py --adv-training --attack PGD --train-multi-noise`).

    Per batch: draw m noise vectors delta_1..m ~ N(0, sigma^2 I) per image; find x' in the
    L2 ball of radius eps around x (and in [0,1]) that maximises the smoothed soft
    classifier's cross-entropy -log((1/m) sum_i softmax(f(x' + delta_i))_y)
    (`smoothed_cross_entropy`) by `steps` L2 PGD steps of size `alpha` (None: 2*eps/steps)
    from x itself, with the noise fixed across the steps and the model in eval mode, as in
    their code; then return the mean CE of f on the m noisy copies x' + delta_i (same noise),
    in the loop's train mode. Steps and projections are the attacks layer's L2 `ThreatModel`
    (steepest L2 step on the normalised gradient, projection onto ball and box).

    Their defaults: m = 1 (`--num-noise-vec`), no random start, no eps warm-up
    (`--warmup 1`); their `--num-steps` default 10 is the recipe's `attack_steps` here. A
    minibatch of B images costs (steps + 1) forward/backward passes over B*m inputs. Noise
    comes from a generator seeded by `seed` (the same seed gives the same weights).

    Shape: x (N, C, H, W) in [0,1], y (N,) -> scalar loss.

    Example:
        loss = SmoothAdvLoss(eps=0.5, sigma=0.25, steps=7, samples=2)(model, x, y)
    """

    def __init__(self, eps: float, sigma: float, steps: int = 7, alpha: float | None = None,
                 samples: int = SMOOTHADV_SAMPLES, seed: int = 0) -> None:
        self.threat = make_threat("l2", eps)
        self.steps, self.samples = int(steps), int(samples)
        self.alpha = SMOOTHADV_STEP * eps / steps if alpha is None else float(alpha)
        self.noise = GaussianNoise(sigma, seed)

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
        """x' for the fixed `noise` (m, N, C, H, W): PGD on `smoothed_cross_entropy`."""
        x = x.detach()
        x_adv = x
        with eval_mode(model), torch.enable_grad():
            for _ in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                loss = smoothed_cross_entropy(model, x_adv, y, noise)
                (grad,) = torch.autograd.grad(loss.sum(), x_adv)
                x_adv = self.threat.project(self.threat.step(x_adv.detach(), grad, self.alpha),
                                            x)
        return x_adv.detach()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        noise = self.noise.sample((self.samples, *x.shape), x)
        x_adv = self.adversarial(model, x, y, noise)
        logits = model((x_adv.unsqueeze(0) + noise).flatten(0, 1))  # copy-major: y.repeat
        return F.cross_entropy(logits, y.repeat(self.samples))


def noisy_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float,
                   seed: int = 0, draws: int = 1) -> float:
    """Accuracy of the base classifier on x + N(0, sigma^2 I) (unclipped), averaged over
    `draws` noise draws from a generator seeded by `seed`: the clean accuracy under the
    noise a smoothed classifier of noise level sigma adds."""
    noise = GaussianNoise(sigma, seed)
    return sum(accuracy(model, noise(x), y) for _ in range(draws)) / draws
