"""Adaptive attacks on input-transformation defenses: BPDA and EOT (Athalye et al. 2018).

A defense that transforms its input before the classifier can "obfuscate" gradients in two
ways (Athalye, Carlini & Wagner 2018, arXiv 1802.00420): the transform is non-differentiable
or has zero gradient almost everywhere (bit-depth reduction: "shattered" gradients), or it is
random, so one gradient describes one draw of the transform only ("stochastic" gradients).
The two fixes live here, in the attacks layer, so every attack gets them:

- **BPDA** (Backward Pass Differentiable Approximation): forward through the transform g,
  backward as if g were a differentiable approximation of it (the identity, g(x) ~ x, by
  default). `InputTransform` is the marker base class that defenses subclass; inside
  `bpda_scope(True)` a transform that says it is not differentiable returns
  a(x) + (g(x) - a(x)).detach(): the value of g(x), the gradient of a(x). `Attack.__call__`
  opens the scope for the attack's whole run, so every gradient it takes (PGD's, APGD's,
  FAB's Jacobians, CW's) goes through the approximation; forward values are unchanged.
- **EOT** (Expectation over Transformation, Athalye et al. 2018, Sec. 4.3): the gradient of
  E_t[loss(f(t(x)))] estimated by averaging the gradient over n draws of the defense's
  randomness. `Attack.input_gradient` does it for `eot_samples=n` in batched forward passes
  of copies of the batch (every copy draws its own randomness per example).

The scope is a context variable reset on exit, not a global flag: nothing leaks between
calls or threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from robust_transfer.errors import UserError

_BPDA: ContextVar[bool] = ContextVar("robust_transfer_bpda", default=False)


@contextmanager
def bpda_scope(enabled: bool = True) -> Iterator[None]:
    """Inside: every non-differentiable `InputTransform` backpropagates through its
    approximation (BPDA). Restored on exit."""
    token = _BPDA.set(bool(enabled))
    try:
        yield
    finally:
        _BPDA.reset(token)


def bpda_active() -> bool:
    return _BPDA.get()


def check_adaptive(bpda: bool, eot_samples: int) -> None:
    """`UserError` unless `eot_samples` is an integer >= 1 and `bpda` a bool."""
    if not isinstance(bpda, bool):
        raise UserError(f"bpda must be true or false, got {bpda!r}")
    if isinstance(eot_samples, bool) or not isinstance(eot_samples, int) or eot_samples < 1:
        raise UserError(f"eot_samples must be an integer >= 1, got {eot_samples!r}")


class InputTransform(nn.Module):
    """Base class of input transformations placed before a classifier (defenses).

    Subclasses implement `transform(x)` and declare:

    - `differentiable`: False when the transform has no useful gradient (zero almost
      everywhere or undefined, e.g. quantisation); BPDA then replaces its backward pass by
      that of `approximation(x)` (the identity unless overridden);
    - `randomized`: True when the transform draws randomness on every call (EOT applies).

    Shape: x (N, C, H, W) in [0,1] -> transformed images in [0,1].

    Example:
        class Quantise(InputTransform):
            differentiable = False
            def transform(self, x): return torch.round(x * 255) / 255
    """

    differentiable: bool = True
    randomized: bool = False

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def approximation(self, x: torch.Tensor) -> torch.Tensor:
        """The differentiable stand-in BPDA backpropagates through (g(x) ~ x by default)."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.transform(x)
        if not self.differentiable and bpda_active() and torch.is_grad_enabled():
            approx = self.approximation(x)
            return approx + (out - approx).detach()
        return out


def eot_gradient(model, loss_fn, x, y, target, samples: int, max_batch: int = 4096):
    """(gradient, mean logits, mean per-example loss) of `loss_fn(model(x), y, target)`
    averaged over `samples` forward passes (EOT), in forward passes of at most about
    `max_batch` images: the batch is repeated, each copy draws its own randomness.
    `samples=1` is the plain gradient."""
    x = x.detach().requires_grad_(True)
    n = len(x)
    per_pass = max(1, min(samples, max_batch // max(n, 1)))
    grad = torch.zeros_like(x)
    logits_sum = loss_sum = None
    done = 0
    while done < samples:
        k = min(per_pass, samples - done)
        xs = x if k == 1 else x.repeat(k, *([1] * (x.ndim - 1)))
        logits = model(xs)
        loss = loss_fn(logits, y.repeat(k), None if target is None else target.repeat(k))
        (g,) = torch.autograd.grad(loss.sum(), x)
        grad += g
        part_logits = logits.detach().view(k, n, -1).sum(0)
        part_loss = loss.detach().view(k, n).sum(0)
        logits_sum = part_logits if logits_sum is None else logits_sum + part_logits
        loss_sum = part_loss if loss_sum is None else loss_sum + part_loss
        done += k
    return grad / samples, logits_sum / samples, loss_sum / samples
