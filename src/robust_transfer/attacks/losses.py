"""Per-example attack losses on logits, oriented so that *ascent* is the attack direction.

Untargeted (target is None): larger = further from the true class y. Targeted: larger =
closer to the target class. Each returns shape (N,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robust_transfer.errors import UserError, check_choice


def cross_entropy(logits, y, target=None):
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def _best_other(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """max_{i != cls} z_i per example."""
    masked = logits.scatter(1, cls.unsqueeze(1), float("-inf"))
    return masked.max(1).values


def margin(logits, y, target=None):
    """Carlini-Wagner margin: max_{i!=y} z_i - z_y (untargeted), z_t - max_{i!=t} z_i (targeted).

    Positive means the attack has succeeded.
    """
    if target is None:
        return _best_other(logits, y) - logits.gather(1, y.unsqueeze(1)).squeeze(1)
    return logits.gather(1, target.unsqueeze(1)).squeeze(1) - _best_other(logits, target)


def dlr(logits, y, target=None):
    """Difference of logits ratio (Croce & Hein 2020, arXiv 2003.01690).

    Untargeted: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12) (needs >= 3 classes).
    Targeted:   -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12) (needs >= 4 classes),
    pi the logits sorted in decreasing order. Invariant to shifting and scaling the logits.
    """
    need = 3 if target is None else 4
    if logits.shape[1] < need:
        kind = "untargeted" if target is None else "targeted"
        raise UserError(f"the {kind} DLR loss needs at least {need} classes, got "
                        f"{logits.shape[1]}; use loss='ce' or 'cw'")
    z_sorted = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    if target is None:
        return -(z_y - _best_other(logits, y)) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)
    z_t = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    denominator = z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3]) + 1e-12
    return -(z_y - z_t) / denominator


LOSSES = {"ce": cross_entropy, "cw": margin, "dlr": dlr}


def get_loss(name: str):
    check_choice("loss", name, LOSSES)
    return LOSSES[name]
