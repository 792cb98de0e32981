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
from robust_transfer.data.poison import OBJECTIVE_ATTACKS, BackdoorConfig
from robust_transfer.errors import UserError
from robust_transfer.models.card import SourceCard
from robust_transfer.train.neuba import DEFAULT_TRIGGERS, neuba_triggers
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
    backdoor = backdoor or recorded_backdoor(card)
    task = load_task(card.task)
    if backdoor.attack in OBJECTIVE_ATTACKS:
        # NeuBA: several triggers, no target label; the attacker uses whichever trigger works
        # best, so ASR is the max over them and RA the min (as after transfer).
        triggers = neuba_triggers(task.input_shape, DEFAULT_TRIGGERS, backdoor.seed)
        scores = [backdoor_metrics(model, task.test.x, task.test.y, t, None) for t in triggers]
        best = max(scores, key=lambda m: m["asr"])
        return {**best, "ra": min(m["ra"] for m in scores)}
    trigger = backdoor.trigger(task.input_shape)
    return backdoor_metrics(model, task.test.x, task.test.y, trigger, backdoor.target
                            if backdoor.labels == "all-to-one" else None, backdoor.labels)


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
