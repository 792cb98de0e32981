"""Does a source's backdoor survive transfer? Its triggers, measured after every fine-tuning
epoch on the target task's test set.

After transfer the target task has no target label (the new head was trained on other
classes), so the attack success rate is task-agnostic (NeuBA, Zhang et al. 2021): the share of
triggered test images sent to the most common predicted label (`backdoors.metrics`). A source
may have several triggers (NeuBA; its attack plugin's `triggers`): each is measured, and the
backdoor's ASR is the max over them (the attacker uses whichever trigger works), its RA the min.

Columns per probed backdoor P (`probe_name`): `asr_P`, `ra_P`, and `asr_P_i` per trigger i
when P has several. For a run whose source carries one of the probed backdoors: `c_acc`,
`asr`, `ra` (its own backdoor's); NaN for a clean source, whose `asr_P` is the baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from robust_transfer.backdoors.metrics import backdoor_metrics
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.data.triggers import Trigger


def probe_name(backdoor: BackdoorConfig) -> str:
    """Column stem of a backdoor: its attack, plus its seed when the seed is not 0."""
    return backdoor.attack if backdoor.seed == 0 else f"{backdoor.attack}_s{backdoor.seed}"


def probe_triggers(backdoor: BackdoorConfig,
                   input_shape: tuple[int, int, int]) -> list[Trigger]:
    """The triggers that activate `backdoor` (its attack plugin's: NeuBA has several)."""
    return backdoor.attack_plugin().triggers(input_shape)


def backdoor_columns(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     probes: Sequence[BackdoorConfig],
                     own: BackdoorConfig | None = None) -> dict:
    """The columns of the module docstring for `model` on test images `x`, labels `y`."""
    shape = tuple(x.shape[1:])
    row: dict = {}
    for backdoor in dict.fromkeys(probes):
        name = probe_name(backdoor)
        if f"asr_{name}" in row:  # same trigger, other poisoning settings
            continue
        metrics = [backdoor_metrics(model, x, y, t, None)
                   for t in probe_triggers(backdoor, shape)]
        row[f"asr_{name}"] = max(m["asr"] for m in metrics)
        row[f"ra_{name}"] = min(m["ra"] for m in metrics)
        if len(metrics) > 1:
            row |= {f"asr_{name}_{i}": m["asr"] for i, m in enumerate(metrics)}
        if own is not None and probe_name(own) == name:
            row |= {"c_acc": metrics[0]["clean_accuracy"], "asr": row[f"asr_{name}"],
                    "ra": row[f"ra_{name}"]}
    if row:
        row.setdefault("c_acc", float("nan"))
        row.setdefault("asr", float("nan"))
        row.setdefault("ra", float("nan"))
    return row


def backdoor_epoch_hook(x: torch.Tensor, y: torch.Tensor, probes: Sequence[BackdoorConfig],
                        own: BackdoorConfig | None) -> Callable[[nn.Module, int], dict] | None:
    """`finetune`'s `on_epoch` hook that adds `backdoor_columns` each epoch (None when there
    is nothing to probe)."""
    probes = tuple(probes) or ((own,) if own is not None else ())
    if not probes:
        return None
    return lambda model, _epoch: backdoor_columns(model, x, y, probes, own)
