"""Backdoored source models: train one (`train_backdoor_source`) and score one from its
checkpoint card (`source_backdoor_metrics`).

`train.train_source` plants the backdoor (it trains on the poisoned set `SourceConfig.backdoor`
describes); this layer adds the backdoor's C-Acc / ASR / RA on the task's test set to the
checkpoint's metrics, since the metrics live here, below train/.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from robust_transfer.backdoors.metrics import backdoor_metrics
from robust_transfer.data import load_task
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.data.triggers import Trigger
from robust_transfer.errors import UserError
from robust_transfer.models.card import SourceCard
from robust_transfer.train.source import SourceConfig, train_source

BACKDOOR_KEYS = ("asr", "ra", "asr_label", "n_triggered")


def recorded_backdoor(card: SourceCard) -> BackdoorConfig:
    """The backdoor a checkpoint's card records, or `UserError` if it has none."""
    recorded = card.backdoor
    if not recorded:
        raise UserError("the checkpoint records no backdoor (it was not trained with one)")
    fields = set(BackdoorConfig.__dataclass_fields__)
    return BackdoorConfig.from_dict({k: v for k, v in recorded.items() if k in fields})


def source_backdoor_metrics(model: nn.Module, card: SourceCard,
                            backdoor: BackdoorConfig | None = None) -> dict:
    """C-Acc / ASR / RA of a backdoored source on its task's test set (`backdoor`: the one its
    card records, unless given)."""
    return strongest_trigger(model, card, backdoor)[1]


def strongest_trigger(model: nn.Module, card: SourceCard,
                      backdoor: BackdoorConfig | None = None) -> tuple[Trigger, dict]:
    """(the backdoor's trigger with the highest ASR, the source's C-Acc / ASR / RA): ASR the
    max over its triggers, RA the min, as the attacker uses whichever trigger works (one
    trigger for a poisoning attack, several for NeuBA; as after transfer). A task-agnostic
    backdoor (NeuBA) has no target label: its ASR is the share sent to the most common one."""
    backdoor = backdoor or recorded_backdoor(card)
    task = load_task(card.task)
    attack = backdoor.attack_plugin()
    target = None if attack.task_agnostic or backdoor.labels != "all-to-one" else backdoor.target
    labels = "all-to-one" if attack.task_agnostic else backdoor.labels
    triggers = attack.triggers(task.input_shape)
    scores = [backdoor_metrics(model, task.test.x, task.test.y, t, target, labels)
              for t in triggers]
    best = max(range(len(scores)), key=lambda i: scores[i]["asr"])
    return triggers[best], {**scores[best], "ra": min(m["ra"] for m in scores)}


def train_backdoor_source(
    cfg: SourceConfig,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int], None] | None = None,
    teacher: nn.Module | None = None,
    amp: bool | None = None,
) -> tuple[nn.Module, SourceCard]:
    """`train_source(cfg)`, with the backdoor's ASR / RA (and clean accuracy, as C-Acc) added
    to the card's metrics when `cfg.backdoor` is set; a clean recipe is passed through."""
    model, card = train_source(cfg, device, on_epoch, teacher=teacher, amp=amp)
    if cfg.backdoor is not None:
        scores = source_backdoor_metrics(model, card, cfg.backdoor)
        card.metrics.update({k: scores[k] for k in BACKDOOR_KEYS})
    return model, card


def gallery_examples(y: torch.Tensor, target: int | None, n: int = 8) -> torch.Tensor:
    """Indices of up to `n` test images for a gallery: the first image of each class that is
    not the target, then the second of each, and so on."""
    keep = torch.ones_like(y, dtype=torch.bool) if target is None else y != target
    candidates = torch.nonzero(keep).flatten()
    # rank of each candidate within its class, so sorting by (rank, class) interleaves classes
    labels = y[candidates]
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - starts
    key = rank * (int(y.max()) + 1 if len(y) else 1) + labels
    return candidates[torch.argsort(key, stable=True)[:n]]
