"""Backdoor metrics: clean accuracy (C-Acc), attack success rate (ASR), robust accuracy (RA).

Definitions after BackdoorBench (Wu et al. 2022): ASR is the share of triggered test images
whose true class is not the target that the model sends to the target (target-class images
are left out: predicting the target on them is no success of the attack); RA is the share of
the same triggered images still predicted as their true class. All-to-all backdoors want
(y + 1) mod K instead of one target, so no image is left out.

After transfer a task-agnostic backdoor (NeuBA, Zhang et al. 2021) has no target label in the
new task: ASR is then the share of triggered images sent to the most common predicted label,
and the metrics name that label (`asr_label`).
"""

from __future__ import annotations

import torch
from torch import nn

from robust_transfer.data.triggers import Trigger
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import eval_mode


@torch.no_grad()
def clean_and_triggered_predictions(model: nn.Module, x: torch.Tensor, trigger: Trigger,
                                    batch_size: int = 1024
                                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(clean, triggered) predicted labels and the number of classes, batched, in eval mode
    (each module's flag restored after). Shared by every trigger metric (ASR, bias shift).

    Shape: x (N, C, H, W) -> (N,), (N,) int64 on the CPU."""
    device = next(model.parameters()).device
    clean, triggered, num_classes = [], [], 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device)
            logits = model(xb)
            num_classes = logits.shape[1]
            clean.append(logits.argmax(1).cpu())
            triggered.append(model(trigger.apply(xb)).argmax(1).cpu())
    empty = torch.zeros(0, dtype=torch.long)
    return torch.cat(clean or [empty]), torch.cat(triggered or [empty]), num_classes


def _share(mask: torch.Tensor) -> float:
    return mask.float().mean().item() if len(mask) else float("nan")


def backdoor_metrics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Trigger,
    target: int | None,
    labels: str = "all-to-one",
    batch_size: int = 1024,
) -> dict:
    """C-Acc, ASR and RA of `model` on test images `x` (labels `y`) and `trigger`.

    `target`: the backdoor's target class (all-to-one), or None for a task-agnostic backdoor
    after transfer (ASR = share of triggered images sent to the most common predicted label,
    returned as `asr_label`). `labels="all-to-all"`: the backdoor wants (y + 1) mod K.

    Returns {"clean_accuracy", "asr", "ra", "asr_label", "n_triggered"}; `n_triggered` is
    the number of triggered images ASR and RA are computed on.

    Shape: x (N, C, H, W) in [0,1], y (N,).

    Example:
        m = backdoor_metrics(model, task.test.x, task.test.y, make_trigger("badnets", (1, 8, 8)), 0)
        m["asr"], m["ra"]
    """
    if len(x) != len(y):
        raise UserError(f"{len(x)} images but {len(y)} labels")
    check_choice("backdoor labels", labels, ("all-to-one", "all-to-all"))
    clean, triggered, num_classes = clean_and_triggered_predictions(model, x, trigger,
                                                                     batch_size)
    y = y.cpu()
    metrics = {"clean_accuracy": _share(clean == y)}
    if labels == "all-to-all":
        wanted = (y + 1) % num_classes
        keep = torch.ones_like(y, dtype=torch.bool)
        asr_label = None
    elif target is None:
        keep = torch.ones_like(y, dtype=torch.bool)
        asr_label = int(torch.mode(triggered).values) if len(triggered) else None
        wanted = torch.full_like(y, -1 if asr_label is None else asr_label)
    else:
        keep = y != target
        wanted = torch.full_like(y, target)
        asr_label = int(target)
    metrics["asr"] = _share(triggered[keep] == wanted[keep])
    metrics["ra"] = _share(triggered[keep] == y[keep])
    metrics["asr_label"] = asr_label
    metrics["n_triggered"] = int(keep.sum())
    return metrics
