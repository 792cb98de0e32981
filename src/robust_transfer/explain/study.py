"""Influence of training images for natural vs robust sources (Utrera et al., arXiv
2007.05869, Figs. 5-6), computed with `explain.influence` over the fine-tuned parameters.

For each fine-tuned model: the influence of every training image on (a) every held-out test
image and (b) every training image (itself excluded). From the scores: the top-k most
influential training images of one test image per class (Fig. 5) and the fraction of the
top-k that share the target's class, k = 1..100 (Fig. 6), grouped by source robustness.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from robust_transfer.data import ImageSet, Task, shots_per_class
from robust_transfer.errors import UserError, check_choice
from robust_transfer.explain.checkpoints import FinetunedModel, load_finetune
from robust_transfer.explain.influence import (
    RANKINGS,
    class_match_fractions,
    make_influence,
    rank_training_images,
)
from robust_transfer.models.checkpoint import read_meta
from robust_transfer.stats import t_interval
from robust_transfer.transfer import FinetuneConfig
from robust_transfer.transfer.run import finetune_from_checkpoint

TARGETS = {"test": "held-out test images", "train": "training images"}


def prepare_finetunes(
    paths: Sequence[str | Path],
    config: FinetuneConfig,
    seeds: Sequence[int],
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    on_finetune: Callable[[str], None] | None = None,
) -> list[Path]:
    """Fine-tune directories for `paths`: fine-tuned checkpoints pass through unchanged;
    source checkpoints are fine-tuned with `config` once per seed (the shared transfer code,
    `finetune_from_checkpoint`) into `out_dir/finetunes/<source>-seed<s>`. An existing
    directory made from the same source with the same config is reused."""
    result = []
    for index, path in enumerate(paths):
        meta = read_meta(path)
        if meta.get("role") == "finetune":
            result.append(Path(path))
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).resolve().name) or "source"
        for seed in seeds:
            cfg = FinetuneConfig(**{**config.to_dict(), "seed": seed})
            target = Path(out_dir) / "finetunes" / f"{index}-{name}-seed{seed}"
            if not _is_same_finetune(target, path, cfg):
                if on_finetune is not None:
                    on_finetune(f"fine-tune {path} (seed {seed}) -> {target}")
                finetune_from_checkpoint(path, cfg, target, device)
            result.append(target)
    return result


def _is_same_finetune(target: Path, source: str | Path, cfg: FinetuneConfig) -> bool:
    try:
        meta = read_meta(target)
    except UserError:
        return False
    return (meta.get("finetune") == cfg.to_dict()
            and Path(meta.get("source", {}).get("path", "")).resolve() == Path(source).resolve())


@dataclass
class InfluenceRun:
    """Influence scores of one fine-tuned model (see `explain.influence` for the sign).

    test_scores[j, i]: training image i on held-out test image `test_index[j]`.
    train_scores[j, i]: training image i on training image `train_index[j]`.
    """

    label: str
    seed: int
    path: Path
    train: ImageSet
    test_index: torch.Tensor
    test_scores: torch.Tensor
    train_index: torch.Tensor
    train_scores: torch.Tensor


@dataclass
class InfluenceExamples:
    """Fig. 5 data: one test image per class and its top-k training images per group."""

    test_images: torch.Tensor  # (C, ch, H, W)
    test_labels: torch.Tensor  # (C,)
    class_names: tuple[int, ...]
    top_images: dict[str, torch.Tensor]  # label -> (C, k, ch, H, W)
    top_labels: dict[str, torch.Tensor]  # label -> (C, k)
    top_scores: dict[str, torch.Tensor]  # label -> (C, k)
    ranking: str = "helpful"  # how the top-k were chosen (see `rank_training_images`)


@dataclass
class InfluenceStudy:
    runs: list[InfluenceRun]
    task: Task
    method: str
    ranking: str
    k_max: int
    unfrozen_blocks: int

    def fractions(self, run: InfluenceRun, targets: str) -> torch.Tensor:
        """(targets, K) class-match fractions of one run."""
        if targets == "test":
            y = self.task.test.y[run.test_index]
            return class_match_fractions(run.test_scores, run.train.y, y, self.k_max,
                                         self.ranking)
        y = run.train.y[run.train_index]
        return class_match_fractions(run.train_scores, run.train.y, y, self.k_max,
                                     self.ranking, exclude=run.train_index)

    def class_match_table(self, level: float = 0.95) -> pd.DataFrame:
        """Tidy rows (label, targets, k, mean, lower, upper, n, over): the mean fraction of
        top-k training images sharing the target's class, with a `level` t-interval over
        seeds when a group has several fine-tunes, else over the target images."""
        rows = []
        for label in dict.fromkeys(r.label for r in self.runs):
            group = [r for r in self.runs if r.label == label]
            for targets, name in TARGETS.items():
                curves = [self.fractions(r, targets).numpy() for r in group]
                k = min(c.shape[1] for c in curves)
                if len(group) > 1:
                    values, over = np.stack([c[:, :k].mean(0) for c in curves]), "seeds"
                else:
                    values, over = curves[0][:, :k], name
                mean, half, _ = t_interval(values, level)
                half = np.nan_to_num(half)  # one value: a zero-width band
                for j in range(k):
                    rows.append({"label": label, "targets": name, "k": j + 1,
                                 "mean": float(mean[j]), "lower": float(mean[j] - half[j]),
                                 "upper": float(mean[j] + half[j]), "n": len(values),
                                 "over": over, "method": self.method,
                                 "ranking": self.ranking,
                                 "unfrozen_blocks": self.unfrozen_blocks})
        return pd.DataFrame(rows)

    def examples(self, top_k: int = 5) -> InfluenceExamples:
        """The first evaluated test image of each class and, for the first fine-tune (lowest
        seed) of each group, its `top_k` most influential training images."""
        first = {}
        for r in sorted(self.runs, key=lambda r: r.seed):
            first.setdefault(r.label, r)
        ref = next(iter(first.values()))
        y = self.task.test.y[ref.test_index]
        rows = [int(torch.nonzero(y == c)[0]) for c in torch.unique(y).tolist()]
        images, labels, scores = {}, {}, {}
        for label, run in first.items():
            top = rank_training_images(run.test_scores[rows], top_k, self.ranking)
            images[label] = run.train.x[top]
            labels[label] = run.train.y[top]
            scores[label] = torch.gather(run.test_scores[rows], 1, top)
        index = ref.test_index[rows]
        return InfluenceExamples(self.task.test.x[index], self.task.test.y[index],
                                 self.task.classes, images, labels, scores, self.ranking)


def _targets(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    return shots_per_class(labels, per_class, seed=0) if per_class else torch.arange(len(labels))


def influence_study(
    finetunes: Sequence[FinetunedModel | str | Path],
    method: str = "exact",
    unfrozen_blocks: int = 0,
    damping: float = 0.0,
    k_max: int = 100,
    ranking: str = "helpful",
    targets_per_class: int | None = None,
    solver_options: dict | None = None,
    device: str | torch.device = "cpu",
    on_run: Callable[[str], None] | None = None,
) -> InfluenceStudy:
    """Influence scores for each fine-tuned model (all on the same target task).

    Parameters are the head plus the last `unfrozen_blocks` blocks (which must have been
    fine-tuned); the L2 term is the fine-tuning weight decay, `damping` is added on top.
    `targets_per_class` caps the targets (test and training images) per class — useful for
    CG/LiSSA over blocks, where each target costs an inverse-HVP.
    """
    if not finetunes:
        raise UserError("influence needs at least one fine-tuned checkpoint")
    if k_max < 1:
        raise UserError(f"top-k must be >= 1, got {k_max}")
    check_choice("ranking", ranking, RANKINGS)
    models = [f if isinstance(f, FinetunedModel) else load_finetune(f, device) for f in finetunes]
    tasks = {m.config.target_task for m in models}
    if len(tasks) > 1:
        raise UserError(f"fine-tunes must share one target task to be compared, got "
                        f"{', '.join(sorted(tasks))}")
    runs = []
    for ft in models:
        tuned = ft.config.unfrozen_blocks
        if tuned is not None and unfrozen_blocks > tuned:
            raise UserError(f"{str(ft.path)!r} fine-tuned the head and {tuned} block(s); "
                            f"influence over {unfrozen_blocks} blocks is not allowed")
        if on_run is not None:
            on_run(f"{ft.label} seed {ft.seed}: {ft.path}")
        module = make_influence(
            method, ft.model, ft.train, unfrozen_blocks=unfrozen_blocks,
            weight_decay=ft.config.train_config().weight_decay, damping=damping,
            **(solver_options or {}),
        )
        test_index = _targets(ft.task.test.y, targets_per_class)
        train_index = _targets(ft.train.y, targets_per_class)
        test = ft.task.test.subset(test_index)
        train_targets = ft.train.subset(train_index)
        runs.append(InfluenceRun(
            ft.label, ft.seed, ft.path, ft.train,
            test_index, module.influences(test.x, test.y).cpu(),
            train_index, module.influences(train_targets.x, train_targets.y).cpu(),
        ))
    return InfluenceStudy(runs, models[0].task, method, ranking, k_max, unfrozen_blocks)


def class_match_summary(table: pd.DataFrame, ks: Sequence[int] = (1, 10, 50, 100)
                        ) -> list[dict]:
    """One row per (source, targets) of `class_match_table()`: mean ± 95% half-width at a
    few k, and what n counts."""
    rows = []
    for (label, targets), d in table.groupby(["label", "targets"], sort=False):
        d = d.set_index("k")
        short = {v: k for k, v in TARGETS.items()}
        over = "seeds" if d["over"].iloc[0] == "seeds" else "images"
        row = {"source": label, "targets": short.get(targets, targets),
               "n": f"{d['n'].iloc[0]} {over}"}
        for k in ks:
            if k in d.index:
                r = d.loc[k]
                row[f"k={k}"] = f"{r['mean']:.3f} ± {(r['upper'] - r['lower']) / 2:.3f}"
        rows.append(row)
    return rows
