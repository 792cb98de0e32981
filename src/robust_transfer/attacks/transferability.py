"""Transferability: adversarial examples crafted on one model, evaluated on another."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from robust_transfer.attacks.evaluate import evaluate
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import predict_logits


def transfer_matrix(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str = "pgd",
    eps: float | Sequence[float] = 8 / 255,
    norm: str = "linf",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress=None,
) -> pd.DataFrame:
    """One row per (eps, source, target): target's accuracy on examples crafted on source.

    The examples are `evaluate`'s worst-case inputs on the source model, so they obey the
    same rules as every robust-accuracy figure: inside the eps-ball (a minimal-norm attack's
    perturbation counts only where its norm is <= eps; elsewhere the clean image is used),
    and examples the source already misclassifies are left clean (AutoAttack's convention).
    Columns: eps, source, target, attack, norm, clean_accuracy (target on clean inputs),
    adversarial_accuracy, fooling_rate (share of the examples the target classifies
    correctly when clean that it misclassifies when adversarial). The diagonal is white-box.
    `progress()` is called after each source model is attacked.
    """
    if len(models) < 2:
        raise UserError(f"a transfer matrix needs two or more models, got {len(models)}")
    eps_list = [float(eps)] if isinstance(eps, int | float) else [float(e) for e in eps]
    clean = {name: predict_logits(m, x).argmax(1) == y for name, m in models.items()}
    rows = []
    for source, model in models.items():
        crafted: dict[float, torch.Tensor] = {}
        evaluate(model, x, y, [attack], eps_list, norm, steps, seed, batch_size, check=False,
                 examples=crafted)
        for e in eps_list:
            for target, target_model in models.items():
                adv_ok = predict_logits(target_model, crafted[e]).argmax(1) == y
                clean_ok = clean[target]
                rows.append({
                    "eps": e, "source": source, "target": target, "attack": attack,
                    "norm": norm, "clean_accuracy": clean_ok.float().mean().item(),
                    "adversarial_accuracy": adv_ok.float().mean().item(),
                    "fooling_rate": (clean_ok & ~adv_ok).sum().item()
                    / max(int(clean_ok.sum()), 1),
                })
        if progress is not None:
            progress()
    return pd.DataFrame(rows)


def as_matrix(table: pd.DataFrame, value: str = "adversarial_accuracy") -> pd.DataFrame:
    """source x target matrix of `value` (rows: crafted on, columns: evaluated on), for a
    table holding one eps."""
    if "eps" in table and table["eps"].nunique() > 1:
        raise UserError("as_matrix needs the rows of one eps; select them first")
    order = list(dict.fromkeys(table["source"]))
    return table.pivot(index="source", columns="target", values=value).loc[order, order]


__all__ = ["transfer_matrix", "as_matrix"]
