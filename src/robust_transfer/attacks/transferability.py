"""Transferability: adversarial examples crafted on one model, evaluated on another."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from torch import nn

from robust_transfer.attacks.evaluate import _as_xy, make_attack, run_batched
from robust_transfer.models.runtime import predict_logits


def transfer_matrix(
    models: Mapping[str, nn.Module],
    data,
    attack: str = "pgd",
    eps: float = 8 / 255,
    norm: str = "linf",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress=None,
) -> pd.DataFrame:
    """One row per (source, target): target's accuracy on examples crafted on source.

    Columns: source, target, attack, eps, norm, clean_accuracy (target on clean inputs),
    adversarial_accuracy, fooling_rate (share of the examples the target classifies
    correctly when clean that it misclassifies when adversarial). The diagonal is white-box.
    `progress()` is called after each source model is attacked.
    """
    x, y = _as_xy(data)
    preds = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        preds[name] = predict_logits(model, x.to(device)).argmax(1).to(x.device)
    rows = []
    for source, model in models.items():
        device = next(model.parameters()).device
        atk = make_attack(attack, model, eps, norm, steps, seed)
        x_adv = run_batched(atk, x, y, batch_size, device)
        for target, target_model in models.items():
            t_dev = next(target_model.parameters()).device
            adv = predict_logits(target_model, x_adv.to(t_dev)).argmax(1).to(x.device)
            clean_ok = preds[target] == y
            rows.append({
                "source": source, "target": target, "attack": attack, "eps": float(eps),
                "norm": norm, "clean_accuracy": clean_ok.float().mean().item(),
                "adversarial_accuracy": (adv == y).float().mean().item(),
                "fooling_rate": ((adv != y) & clean_ok).sum().item() / max(int(clean_ok.sum()), 1),
            })
        if progress is not None:
            progress()
    return pd.DataFrame(rows)


def as_matrix(table: pd.DataFrame, value: str = "adversarial_accuracy") -> pd.DataFrame:
    """source x target matrix of `value` (rows: crafted on, columns: evaluated on)."""
    order = list(dict.fromkeys(table["source"]))
    return table.pivot(index="source", columns="target", values=value).loc[order, order]


__all__ = ["transfer_matrix", "as_matrix"]
