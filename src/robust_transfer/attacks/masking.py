"""Gradient-masking checks (after AutoAttack's `checks.py`, Croce & Hein 2020).

Each check emits a `GradientMaskingWarning` naming what looks wrong (its `check` attribute
names the check, so a caller that records warnings can tell them apart), and returns whether
it fired, so an evaluation can record it. A warning is a reason to distrust white-box robust
accuracy, not proof of it.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.attacks.adaptive import bpda_scope
from robust_transfer.models.runtime import eval_mode

# The names a `GradientMaskingWarning.check` can take.
CHECKS = ("nan_gradients", "zero_gradients", "randomized", "softmax_output", "rising_with_eps",
          "black_box_better")


class GradientMaskingWarning(UserWarning):
    """The model or the evaluation shows a sign of gradient masking; `check` names which."""

    def __init__(self, message: str, check: str = "") -> None:
        super().__init__(message)
        self.check = check


def _warn(message: str, check: str) -> None:
    warnings.warn(GradientMaskingWarning(message, check), stacklevel=3)


def check_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bpda: bool = False,
                eot_samples: int = 1) -> dict[str, bool]:
    """Checks on the model itself: zero or NaN input gradients, randomness in the forward
    pass, outputs that are probabilities rather than logits. Returns {check: fired}.

    The gradient is taken as the attack will take it: with `bpda`, through the BPDA
    approximations of non-differentiable input transforms. A randomized forward pass is
    reported in the result either way but warns only when `eot_samples` is 1 (the warning's
    advice, EOT, is then not being followed)."""
    found = {}
    with eval_mode(model), torch.enable_grad(), bpda_scope(bpda):
        xr = x.detach().clone().requires_grad_(True)
        out = model(xr)
        (grad,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xr)
        with torch.no_grad():
            again = model(x)
    out = out.detach()
    g = grad.flatten(1)
    nan = ~torch.isfinite(g).all(1)
    zero = (g == 0).all(1) & ~nan
    found["nan_gradients"] = bool(nan.any())
    if found["nan_gradients"]:
        _warn(f"{int(nan.sum())} of {len(x)} inputs have NaN/inf input gradients: "
              "gradient attacks will fail for reasons other than robustness", "nan_gradients")
    found["zero_gradients"] = bool(zero.any())
    if found["zero_gradients"]:
        _warn(f"{int(zero.sum())} of {len(x)} inputs have all-zero input gradients "
              "(non-differentiable or saturated model?): white-box robust accuracy may be "
              "overestimated; try BPDA or a black-box attack such as Square", "zero_gradients")
    found["randomized"] = not torch.allclose(out, again, rtol=1e-5, atol=1e-6)
    if found["randomized"] and eot_samples <= 1:
        _warn("the forward pass is not deterministic in eval mode (randomized defense?): "
              "use expectation over transformation; single-run robust accuracy is unreliable",
              "randomized")
    rows_sum_to_one = torch.allclose(out.sum(1), torch.ones(len(out), dtype=out.dtype),
                                     atol=1e-3)
    found["softmax_output"] = bool(rows_sum_to_one and (out >= 0).all())
    if found["softmax_output"]:
        _warn("the model outputs look like probabilities (non-negative, rows sum to 1), not "
              "logits: cross-entropy on them masks gradients; remove the softmax",
              "softmax_output")
    return found


def check_eps_curve(eps: list[float], robust_acc: list[float], tol: float = 0.0) -> bool:
    """Robust accuracy must not rise with eps (a bigger ball contains the smaller one)."""
    pairs = sorted(zip(eps, robust_acc, strict=True))
    rising = [(e1, a1, e2, a2) for (e1, a1), (e2, a2) in zip(pairs, pairs[1:], strict=False)
              if a2 > a1 + tol and not math.isnan(a1 + a2)]
    if rising:
        e1, a1, e2, a2 = rising[0]
        _warn(f"robust accuracy rises with eps ({a1:.4f} at eps={e1} -> {a2:.4f} at eps={e2}): "
              "the attack is failing, not the model succeeding", "rising_with_eps")
    return bool(rising)


def check_black_box(stages: list[tuple[str, bool, float]], tol: float = 0.002) -> bool:
    """`stages` = [(attack, is_black_box, robust accuracy after it)] in cascade order.

    Fires when a black-box stage lowers robust accuracy by more than `tol` below what the
    white-box stages before it reached (AutoAttack's threshold: 0.002).
    """
    white = [acc for _, bb, acc in stages if not bb]
    fired = False
    best_white = None
    for name, bb, acc in stages:
        if not bb:
            best_white = acc if best_white is None else min(best_white, acc)
        elif best_white is not None and acc < best_white - tol:
            _warn(f"black-box attack {name!r} lowered robust accuracy from {best_white:.4f} to "
                  f"{acc:.4f} after the white-box attacks: a sign of gradient masking",
                  "black_box_better")
            fired = True
    return fired and bool(white)
