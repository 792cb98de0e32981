"""Does a backdoor watermark (Adi et al. 2018, USENIX Security) survive removal attacks and
transfer to a new task, and at what cost in accuracy? The verification after transfer, and the
study that runs every attack.

After transfer the head is new and its classes are the target's, so trigger accuracy against
the key's labels means nothing, and the binomial test against 1/K is not valid: a model that
sends every trigger image to one class would score 1.0 after any label mapping. The honest test
here (`transfer_verify`) asks whether the transferred model's predictions on the trigger images
still *depend on* the watermark labels:

1. split the key in two halves (seeded); on half A, map each watermark label to the target class
   most of its images are predicted as (ties: the lowest class; a label absent from A: A's most
   common prediction); score the mapping on half B; swap the halves and average (cross-fitting);
2. the p-value is a permutation test of that statistic over the key's labels (seeded; default
   1,000 permutations, p = (1 + #{permuted >= observed}) / (1 + permutations)): under the null
   the predictions are independent of the labels, so permuting them changes nothing. A constant
   model scores 1.0 under every permutation too, so its p-value is 1.

`watermark_study` runs the baselines (watermarked and an independently trained model, the
binomial test), each removal attack, and transfer at a few unfrozen-block settings (through
`transfer.engines.finetune`, the one fine-tuning protocol; the independent model is
transferred too, as the accuracy reference and the permutation test's negative control), over
seeds; one tidy row per model and seed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import nn

from robust_transfer.backdoors.watermark import (
    ALPHA,
    ATTACKS,
    RemovalConfig,
    WatermarkKey,
    key_predictions,
    remove,
    verify,
)
from robust_transfer.data import load_task
from robust_transfer.data.tasks import Shots, check_task, parse_shots
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.runtime import accuracy
from robust_transfer.transfer.engines import finetune
from robust_transfer.transfer.finetune import FinetuneConfig, parse_blocks

PERMUTATIONS = 1000


def _mapped_scores(pred: torch.Tensor, labels: torch.Tensor, half_a: torch.Tensor,
                   half_b: torch.Tensor, num_labels: int, num_targets: int) -> torch.Tensor:
    """Accuracy on `half_b` of the majority mapping label -> prediction fitted on `half_a`, for
    each row of `labels` (R, n); `pred` (n,). Vectorised over rows."""
    rows = len(labels)
    flat = labels[:, half_a] * num_targets + pred[half_a]
    counts = torch.zeros(rows, num_labels * num_targets).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float)).view(rows, num_labels, num_targets)
    fallback = torch.bincount(pred[half_a], minlength=num_targets).argmax()
    mapping = torch.where(counts.sum(-1) > 0, counts.argmax(-1), fallback)
    return (mapping.gather(1, labels[:, half_b]) == pred[half_b]).float().mean(1)


def permutation_test(pred: torch.Tensor, labels: torch.Tensor, num_labels: int,
                     num_targets: int, permutations: int = PERMUTATIONS,
                     seed: int = 0) -> dict:
    """Cross-fitted mapped accuracy of predictions `pred` (n,) on watermark `labels` (n,), and
    its permutation p-value over the labels (see the module docstring).

    Returns {mapped_accuracy, null_mean (the statistic's mean over permutations: its chance
    level), p_value, permutations}.

    Example:
        permutation_test(model_predictions, key.y, 5, 5)["p_value"]
    """
    if permutations < 1:
        raise UserError(f"permutations must be >= 1, got {permutations}")
    n = len(labels)
    if n < 2:
        raise UserError("the permutation test needs at least 2 trigger images")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    half_a, half_b = order[: n // 2], order[n // 2 :]
    perms = torch.argsort(torch.rand(permutations, n, generator=gen), dim=1)
    rows = torch.cat([labels.view(1, n), labels[perms]])  # row 0: the observed labels
    pred, rows = pred.long().cpu(), rows.long().cpu()
    scores = (_mapped_scores(pred, rows, half_a, half_b, num_labels, num_targets)
              + _mapped_scores(pred, rows, half_b, half_a, num_labels, num_targets)) / 2
    observed, null = scores[0], scores[1:]
    p = (1 + int((null >= observed - 1e-9).sum())) / (1 + permutations)
    return {"mapped_accuracy": float(observed), "null_mean": float(null.mean()),
            "p_value": p, "permutations": permutations}


def transfer_verify(model: nn.Module, key: WatermarkKey, alpha: float = ALPHA,
                    permutations: int = PERMUTATIONS, seed: int = 0) -> dict:
    """Ownership of a model transferred to another task: `permutation_test` of its predictions
    on the trigger images against the key's labels.

    Returns {trigger_accuracy (the mapped accuracy), chance (the permutation null mean),
    p_value, owned (p < alpha), verification: "permutation"}.

    Example:
        transfer_verify(finetuned, key)["owned"]
    """
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha}")
    pred = key_predictions(model, key)
    t = permutation_test(pred, key.y, key.num_classes, model.spec.num_classes, permutations,
                         seed)
    return {"trigger_accuracy": t["mapped_accuracy"], "chance": t["null_mean"],
            "p_value": t["p_value"], "owned": bool(t["p_value"] < alpha),
            "verification": "permutation"}


@dataclass(frozen=True)
class StudyConfig:
    """The removal study: `attacks` (each with `removal`'s budget), transfer to
    `transfer_task` (None: none) with each of `transfer_blocks` unfrozen (None = all), on
    `transfer_shots` images per class for `transfer_epochs`; every attack and transfer once
    per seed in `seeds` (the seed draws the attacker's data, the new head and the batch
    order); ownership at `alpha`, after transfer by `permutations` permutations."""

    attacks: tuple[str, ...] = ATTACKS
    removal: RemovalConfig = field(default_factory=RemovalConfig)
    transfer_task: str | None = "digits-5to9"
    transfer_blocks: tuple[int | None, ...] = (0, 1, None)
    transfer_shots: Shots = "all"
    transfer_epochs: int = 30
    transfer_lr: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha: float = ALPHA
    permutations: int = PERMUTATIONS

    def __post_init__(self) -> None:
        for a in self.attacks:
            check_choice("removal attack", a, ATTACKS)
        if self.transfer_task is not None:
            check_task(self.transfer_task)
        object.__setattr__(self, "transfer_shots", parse_shots(self.transfer_shots))
        object.__setattr__(self, "transfer_blocks",
                           tuple(parse_blocks(b) for b in self.transfer_blocks))
        if not self.seeds:
            raise UserError("the watermark study needs at least one seed")
        if not 0 < self.alpha < 1:
            raise UserError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.transfer_epochs < 1 or not self.transfer_lr > 0 or self.permutations < 1:
            raise UserError("transfer epochs and permutations must be >= 1 and lr > 0")

    def finetune_config(self, blocks: int | None, seed: int) -> FinetuneConfig:
        return FinetuneConfig(target_task=self.transfer_task,
                              images_per_class=self.transfer_shots, unfrozen_blocks=blocks,
                              epochs=self.transfer_epochs, lr=self.transfer_lr, seed=seed)

    def steps(self) -> int:
        """Units of work `watermark_study` reports progress in."""
        per_seed = len(self.attacks) + (2 * len(self.transfer_blocks)
                                        if self.transfer_task else 0)
        return 2 + per_seed * len(self.seeds)


def blocks_label(blocks: int | None) -> str:
    return "all" if blocks is None else str(blocks)


def _row(model_name: str, source: str, stage: str, seed: int, task: str, test_accuracy: float,
         v: dict, seconds: float, **extra) -> dict:
    return {"model": model_name, "source": source, "stage": stage, "seed": seed, "task": task,
            "test_accuracy": test_accuracy, "trigger_accuracy": v["trigger_accuracy"],
            "chance": v["chance"], "p_value": v["p_value"], "owned": v["owned"],
            "verification": v.get("verification", "binomial"), "seconds": seconds, **extra}


def watermark_study(watermarked: nn.Module, independent: nn.Module, key: WatermarkKey,
                    source_task: str, cfg: StudyConfig = StudyConfig(),
                    on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per model and seed: the two baselines, every removal attack of `watermarked`,
    and transfers of both models; columns model, source, stage (baseline | removal | transfer),
    seed, task, test_accuracy (on `task`'s test set), trigger_accuracy, chance, p_value, owned,
    verification (binomial | permutation), seconds, unfrozen_blocks, reference_accuracy and
    accuracy_change (against the watermarked source for removals, the independent model's
    transfer for transfers), and the study's settings.

    Example:
        table = watermark_study(model, clean_model, key, "digits-0to4")
    """
    step = on_step or (lambda _name: None)
    task = load_task(source_task)
    rows = []

    def test_acc(m, t):
        return accuracy(m, t.test.x, t.test.y)

    base_acc = test_acc(watermarked, task)
    for name, m in (("watermarked", watermarked), ("independent", independent)):
        rows.append(_row(name, name, "baseline", -1, source_task, test_acc(m, task),
                         verify(m, key, cfg.alpha), 0.0))
        step(name)
    target = load_task(cfg.transfer_task) if cfg.transfer_task else None
    for seed in cfg.seeds:
        removal = RemovalConfig(**{**asdict(cfg.removal), "seed": seed})
        for attack in cfg.attacks:
            start = time.perf_counter()
            attacked = remove(watermarked, attack, task, removal)
            seconds = time.perf_counter() - start
            acc = test_acc(attacked, task)
            rows.append(_row(attack, "watermarked", "removal", seed, source_task, acc,
                             verify(attacked, key, cfg.alpha), seconds,
                             reference_accuracy=base_acc, accuracy_change=acc - base_acc))
            step(attack)
        for blocks in cfg.transfer_blocks if target is not None else ():
            name = f"transfer k={blocks_label(blocks)}"
            results = {}
            for source, m in (("watermarked", watermarked), ("independent", independent)):
                start = time.perf_counter()
                tuned = copy.deepcopy(m)
                finetune(tuned, cfg.finetune_config(blocks, seed))
                seconds = time.perf_counter() - start
                results[source] = (test_acc(tuned, target), transfer_verify(
                    tuned, key, cfg.alpha, cfg.permutations, seed), seconds)
                step(f"{name} ({source})")
            ref = results["independent"][0]
            for source, (acc, v, seconds) in results.items():
                rows.append(_row(name if source == "watermarked" else f"{name} (independent)",
                                 source, "transfer", seed, cfg.transfer_task, acc, v, seconds,
                                 unfrozen_blocks=blocks_label(blocks), reference_accuracy=ref,
                                 accuracy_change=acc - ref))
    table = pd.DataFrame(rows)
    settings = {"alpha": cfg.alpha, "trigger_size": len(key), "key_seed": key.seed,
                "attacker_clean_fraction": cfg.removal.clean_fraction,
                "removal_epochs": cfg.removal.epochs, "removal_lr": cfg.removal.lr,
                "transfer_shots": str(cfg.transfer_shots),
                "transfer_epochs": cfg.transfer_epochs, "transfer_lr": cfg.transfer_lr,
                "permutations": cfg.permutations}
    for column in ("unfrozen_blocks", "reference_accuracy", "accuracy_change"):
        if column not in table:
            table[column] = None
    return table.assign(**settings)
