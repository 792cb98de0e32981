"""Named class-split tasks with a fixed stratified train/test split, and k-shot subsets.

A task picks some classes of a dataset and relabels them 0..K-1. The split is fixed (seed 0,
30% test, stratified), so every run of every experiment sees the same test set.
`shots_per_class` draws k training images per class reproducibly from a seed; the same seed
gives the same subset whichever source model is being fine-tuned (paired comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from robust_transfer.data.datasets import ImageSet, digits, synthetic
from robust_transfer.errors import UserError, check_choice

TEST_FRACTION = 0.3
SPLIT_SEED = 0


@dataclass(frozen=True)
class Task:
    """A classification task: train and test sets, labels already 0..num_classes-1."""

    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    classes: tuple[int, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


_DATASETS = {"digits": digits, "synthetic": synthetic}

# name -> (dataset, original classes)
TASKS: dict[str, tuple[str, tuple[int, ...]]] = {
    "digits": ("digits", tuple(range(10))),
    "digits-0to4": ("digits", (0, 1, 2, 3, 4)),
    "digits-5to9": ("digits", (5, 6, 7, 8, 9)),
    "digits-even": ("digits", (0, 2, 4, 6, 8)),
    "digits-odd": ("digits", (1, 3, 5, 7, 9)),
    "synthetic": ("synthetic", tuple(range(10))),
    "synthetic-0to4": ("synthetic", (0, 1, 2, 3, 4)),
    "synthetic-5to9": ("synthetic", (5, 6, 7, 8, 9)),
}


@cache
def _dataset(name: str) -> ImageSet:
    return _DATASETS[name]()


@cache
def load_task(name: str) -> Task:
    """The task called `name` (see `TASKS`), with its fixed stratified train/test split."""
    from sklearn.model_selection import train_test_split

    check_choice("task", name, TASKS)
    dataset_name, classes = TASKS[name]
    data = _dataset(dataset_name)
    keep = torch.isin(data.y, torch.tensor(classes))
    x, y_orig = data.x[keep], data.y[keep]
    relabel = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([relabel[int(c)] for c in y_orig], dtype=torch.long)
    index = np.arange(len(y))
    train_idx, test_idx = train_test_split(
        index, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y.numpy()
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return Task(
        name=name,
        train=ImageSet(x[train_idx], y[train_idx]),
        test=ImageSet(x[test_idx], y[test_idx]),
        num_classes=len(classes),
        classes=classes,
    )


def parse_shots(value: int | str) -> int | None:
    """Images per class from the user: a positive int, or "all" (returned as None)."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return None
        if not value.strip().isdigit():
            raise UserError(f"images per class must be a positive integer or 'all', got {value!r}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"images per class must be a positive integer or 'all', got {value!r}")
    return value


def shots_per_class(labels: torch.Tensor, k: int | str | None, seed: int) -> torch.Tensor:
    """Sorted indices of `k` examples per class drawn with `seed` (None or "all": every one).

    Raises `UserError` when some class has fewer than `k` examples.
    """
    k = parse_shots(k) if k is not None else None
    if k is None:
        return torch.arange(len(labels))
    gen = np.random.default_rng(seed)
    y = labels.numpy()
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if k > len(members):
            raise UserError(
                f"images per class {k} is more than class {c} has ({len(members)}); "
                f"use at most {min(np.bincount(y))} or 'all'"
            )
        chosen.append(gen.choice(members, size=k, replace=False))
    return torch.as_tensor(np.sort(np.concatenate(chosen)), dtype=torch.long)
