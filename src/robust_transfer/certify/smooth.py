"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019, arXiv 1902.02918): PREDICT and CERTIFY.

The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c) of a base classifier f.
`Smooth.predict` and `Smooth.certify` are the paper's two Monte Carlo algorithms, as in the
reference code (locuslab/smoothing, `core.py`): PREDICT returns the top class of n draws when
a two-sided binomial test of its count against the runner-up's rejects "equally likely" at
level alpha, else abstains; CERTIFY picks the top class on n0 draws, estimates its probability
on n fresh draws, and certifies the L2 radius sigma * PhiInv(pA_lower) when the one-sided
(1 - alpha) Clopper-Pearson lower bound pA_lower exceeds 1/2, else abstains. With probability
at least 1 - alpha a returned class is g(x) and g is constant within the radius (Theorem 1).

Noise is not clipped to [0, 1] (the paper's and the reference code's choice). It is drawn per
example, in streams of BLOCK draws: stream b of an image is `torch.randn` from a generator
seeded by a hash of (seed, the image's content, the algorithm's stage, b) (`attacks.rng.
ExampleRNG`), so an image's result does not depend on the batch it is certified in, nor on
`batch_size`; the hashing is per stream, the normals come at torch's speed. The draws of many
images go through the model together, in forward passes of about `batch_size` noisy images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from robust_transfer.attacks.rng import ExampleRNG
from robust_transfer.data.augment import check_sigma
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import eval_mode

ABSTAIN = -1
# Draws per noise stream: draw j of an image is coordinate (j mod BLOCK) of stream j // BLOCK,
# so the noise does not depend on how draws are grouped into forward passes.
BLOCK = 100
# Streams (`ExampleRNG` counters) of the three sampling steps.
_SELECT, _ESTIMATE, _PREDICT = 0, 1, 2


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_budget(n0: int, n: int, alpha: float) -> None:
    """`UserError` unless n0 and n are integers >= 1 with n0 <= n and alpha is in (0, 1)."""
    _check_count(n0, "n0")
    _check_count(n, "n")
    if n0 > n:
        raise UserError(f"n0 (draws to select the class, {n0}) must not exceed n (draws to "
                        f"estimate its probability, {n})")
    check_alpha(alpha)


def lower_confidence_bound(n_a: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion n_a / n:
    the alpha quantile of Beta(n_a, n - n_a + 1), 0 where n_a = 0 (statsmodels'
    `proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0]`, as in Cohen et al.)."""
    n_a = np.asarray(n_a, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, np.maximum(n_a, 1), n - n_a + 1)
    return np.where(n_a > 0, bound, 0.0)


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer per image: `prediction` (ABSTAIN = -1), certified L2 `radius` (0 when
    abstaining), `p_lower` (the bound on pA), `counts` (N, C: the estimation draws' classes,
    for the base model's accuracy under noise); all on the CPU."""

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    counts: torch.Tensor


class Smooth:
    """The smoothed classifier g of a base classifier under Gaussian noise N(0, sigma^2 I).

    `predict(x, n, alpha)` and `certify(x, n0, n, alpha)` are Cohen et al.'s PREDICT and
    CERTIFY (module docstring); `counts(x, n)` the classes of n noisy draws per image. The
    base model runs in eval mode without gradients; its modules' modes are restored.

    Shape: x (N, C, H, W) in [0,1] -> (N,) predictions, ABSTAIN (-1) where the test fails.

    Example:
        smooth = Smooth(model, num_classes=10, sigma=0.25)
        cert = smooth.certify(x, n0=100, n=100_000, alpha=0.001)   # cert.prediction, .radius
    """

    def __init__(self, model: nn.Module, num_classes: int, sigma: float) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise UserError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.model = model
        self.num_classes = num_classes
        self.sigma = check_sigma(sigma)

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(f"Smooth needs images of shape (N, C, H, W), got {shape}")

    @staticmethod
    def _noise(rng: ExampleRNG, shape: tuple[int, ...], stage: int, start: int, stop: int,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(N, stop - start, *shape) standard normal draws start..stop-1 of each image: stream
        b (draws b*BLOCK..) is `torch.randn` from a generator seeded by (image, stage, b)
        (`ExampleRNG`), so it is the same in any batch; a stream's last, partial block has
        the same length whatever the batching (passes hold whole streams)."""
        out = torch.empty(len(rng), stop - start, *shape, dtype=dtype, device=device)
        g = torch.Generator(device=device)
        for b in range(start // BLOCK, -(-stop // BLOCK)):
            lo, hi = b * BLOCK - start, min(stop, (b + 1) * BLOCK) - start
            seeds = (rng.uniform((1,), stage, b, dtype=torch.float64) * 2.0**53).long()
            for i, s in enumerate(seeds.flatten().tolist()):
                g.manual_seed(s)
                out[i, lo:hi] = torch.randn((hi - lo, *shape), generator=g, dtype=dtype,
                                            device=device)
        return out

    @torch.no_grad()
    def counts(self, x: torch.Tensor, n: int, batch_size: int = 1000, seed: int = 0,
               stage: int = _PREDICT) -> torch.Tensor:
        """(N, num_classes) int64: how often f classified each of n noisy copies of each image
        as each class. Draw j of image i depends on (seed, x[i], stage, j) only."""
        self._check_x(x)
        _check_count(n, "n")
        _check_count(batch_size, "batch_size")
        device = next(self.model.parameters()).device
        x = x.detach().to(device)
        rng = ExampleRNG.for_inputs(x, seed)
        total = torch.zeros(len(x), self.num_classes, dtype=torch.long, device=device)
        # draws per image per pass: whole streams, as many as fit `batch_size` for all images
        per_pass = min(n, BLOCK * max(1, batch_size // (BLOCK * max(len(x), 1))))
        images = max(1, batch_size // per_pass)
        shape = tuple(x.shape[1:])
        with eval_mode(self.model):
            for i in range(0, len(x), images):
                xi, ri = x[i:i + images], rng[i:i + images]
                for start in range(0, n, per_pass):
                    stop = min(n, start + per_pass)
                    noise = self._noise(ri, shape, stage, start, stop, x.dtype, device)
                    batch = (xi.unsqueeze(1) + self.sigma * noise).flatten(0, 1)
                    pred = self.model(batch).argmax(1).view(len(xi), -1)
                    offset = torch.arange(len(xi), device=device).unsqueeze(1) * self.num_classes
                    total[i:i + images] += torch.bincount(
                        (pred + offset).flatten(), minlength=len(xi) * self.num_classes
                    ).view(len(xi), self.num_classes)
        return total

    def predict(self, x: torch.Tensor, n: int = 100_000, alpha: float = 0.001,
                batch_size: int = 1000, seed: int = 0) -> torch.Tensor:
        """PREDICT: (N,) the top class of n draws, or ABSTAIN unless the two-sided binomial
        test of n_A out of n_A + n_B (top two counts) at p = 1/2 has p-value <= alpha. On the
        CPU."""
        check_alpha(alpha)
        counts = self.counts(x, n, batch_size, seed, _PREDICT).cpu()
        top2 = counts.topk(2, dim=1)
        out = top2.indices[:, 0].clone()
        for i, (n_a, n_b) in enumerate(top2.values.tolist()):
            if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
                out[i] = ABSTAIN
        return out

    def certify(self, x: torch.Tensor, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                batch_size: int = 1000, seed: int = 0) -> Certificate:
        """CERTIFY: c_A = top class of n0 draws; p_A_lower = Clopper-Pearson bound of its count
        among n fresh draws; (c_A, sigma * PhiInv(p_A_lower)) if p_A_lower > 1/2, else
        (ABSTAIN, 0)."""
        check_budget(n0, n, alpha)
        selected = self.counts(x, n0, batch_size, seed, _SELECT).argmax(1)
        counts = self.counts(x, n, batch_size, seed, _ESTIMATE)
        n_a = counts.gather(1, selected.unsqueeze(1)).squeeze(1).cpu().numpy()
        p_lower = lower_confidence_bound(n_a, n, alpha)
        certified = p_lower > 0.5
        radius = np.where(certified, self.sigma * norm.ppf(np.where(certified, p_lower, 0.75)),
                          0.0)
        prediction = torch.where(torch.as_tensor(certified), selected.cpu(), ABSTAIN)
        return Certificate(prediction, torch.as_tensor(radius, dtype=torch.float64),
                           torch.as_tensor(p_lower, dtype=torch.float64), counts.cpu())
