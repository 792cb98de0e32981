"""What the explanations need to know about a checkpoint: its robustness label and its data.

Source checkpoints carry `eps`/`norm`; fine-tuned ones carry `source.source_eps` /
`source.source_norm` and `finetune` (the `FinetuneConfig`). Natural = eps 0, robust = eps > 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from robust_transfer.data import ImageSet, Task, load_task, shots_per_class
from robust_transfer.errors import UserError
from robust_transfer.models import SourceCard, load_checkpoint
from robust_transfer.models.nets import ConvNet
from robust_transfer.transfer import FinetuneConfig

SPLITS = ("train", "test", "all")


def robustness(card: SourceCard) -> tuple[float, str]:
    """(eps, norm) of the source behind a checkpoint (its own for a source model)."""
    if card.role == "finetune":
        source = card.source or {}
        return float(source.get("source_eps", 0.0)), str(source.get("source_norm", ""))
    return (float(0.0 if card.eps is None else card.eps),
            str("" if card.norm is None else card.norm))


def robustness_label(card: SourceCard) -> str:
    """'natural' or 'robust (l2 eps=0.5)'."""
    eps, norm = robustness(card)
    return "natural" if eps == 0 else f"robust ({norm} eps={eps:g})"


def unique_labels(labels: list[str]) -> list[str]:
    """Append ' #2', ' #3', ... to repeated labels, keeping order."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def checkpoint_task(card: SourceCard, path: str | Path) -> Task:
    """The task a checkpoint classifies (its target task when fine-tuned)."""
    name = card.task
    if not name:
        raise UserError(f"checkpoint {str(path)!r} does not say which task it was trained on")
    task = load_task(name)
    if task.num_classes != card.model.num_classes:
        raise UserError(f"checkpoint {str(path)!r} has {card.model.num_classes} classes "
                        f"but its task {name!r} has {task.num_classes}")
    return task


def task_split(task: Task, split: str) -> ImageSet:
    """The 'train', 'test' or 'all' (train then test) images of `task`."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if split == "all":
        return ImageSet(torch.cat([task.train.x, task.test.x]),
                        torch.cat([task.train.y, task.test.y]))
    return getattr(task, split)


@dataclass
class FinetunedModel:
    """A fine-tuned checkpoint with the exact training set it was fine-tuned on."""

    path: Path
    model: ConvNet
    card: SourceCard
    config: FinetuneConfig
    task: Task
    train: ImageSet
    train_index: torch.Tensor  # `train`'s images in `task.train`

    @property
    def label(self) -> str:
        return robustness_label(self.card)

    @property
    def eps(self) -> float:
        return robustness(self.card)[0]

    @property
    def seed(self) -> int:
        return self.config.seed


def load_finetune(path: str | Path, device: str | torch.device = "cpu") -> FinetunedModel:
    """Load a fine-tune directory (meta role 'finetune') and rebuild its training subset."""
    model, card = load_checkpoint(path, device)
    if card.role != "finetune" or card.finetune is None:
        raise UserError(f"{str(path)!r} is not a fine-tuned checkpoint (meta role "
                        f"{card.role!r}); pass a fine-tune directory")
    known = {f.name for f in fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: v for k, v in card.finetune.items() if k in known})
    task = load_task(config.target_task)
    index = shots_per_class(task.train.y, config.images_per_class, config.seed)
    return FinetunedModel(Path(path), model, card, config, task, task.train.subset(index), index)


@dataclass
class LabelledModel:
    """A checkpoint loaded for explanation, with its robustness label and task."""

    path: Path
    label: str
    model: ConvNet
    card: SourceCard
    task: Task


def load_labelled(paths: list[str | Path], task: str | None = None,
                  device: str | torch.device = "cpu") -> list[LabelledModel]:
    """Load checkpoints that classify one task (`task`, default: the first one's), labelled
    'natural' / 'robust (...)' (made unique). Mixed tasks are a `UserError`."""
    if not paths:
        raise UserError("give at least one checkpoint directory")
    loaded = [(Path(p), *load_checkpoint(p, device)) for p in paths]
    tasks = [checkpoint_task(card, path) for path, _, card in loaded]
    chosen = load_task(task) if task else tasks[0]
    for (path, _, _), t in zip(loaded, tasks, strict=True):
        if t.name != chosen.name:
            raise UserError(f"checkpoint {str(path)!r} classifies task {t.name!r}, not "
                            f"{chosen.name!r}; explain models of one task together")
    labels = unique_labels([robustness_label(card) for _, _, card in loaded])
    return [LabelledModel(path, label, model, card, chosen)
            for (path, model, card), label in zip(loaded, labels, strict=True)]
