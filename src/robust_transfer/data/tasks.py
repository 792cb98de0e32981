"""Named class-split tasks with a fixed train/test split, and k-shot subsets.

A task picks some classes of a dataset and relabels them 0..K-1. Data sets with an official
test set (CIFAR-10/100, SVHN, MNIST, Fashion-MNIST, KMNIST, an ImageFolder tree with train/ and
test/) keep it; the others get a fixed split (seed 0, 30% test, stratified), so
every run of every experiment sees the same test set.
`shots_per_class` draws k training images per class reproducibly from a seed; the same seed
gives the same subset whichever source model is being fine-tuned (paired comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import torch

from robust_transfer.data.datasets import ImageSet, cifar10, digits, synthetic
from robust_transfer.data.files import cifar100, idx_dataset, image_folder, svhn
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


# name -> loader returning the whole set (to be split) or its official (train, test) pair
_DATASETS = {
    "digits": digits, "synthetic": synthetic, "cifar10": cifar10,
    "mnist": lambda: idx_dataset("mnist"),
    "fashion-mnist": lambda: idx_dataset("fashion-mnist"),
    "kmnist": lambda: idx_dataset("kmnist"),
    "cifar100": cifar100,
    "cifar100-coarse": lambda: cifar100(coarse=True),
    "svhn": svhn,
}
# `imagefolder:<dir>` or `imagefolder:<dir>@<size>`: every class folder of <dir>.
IMAGEFOLDER = "imagefolder:"

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
    "cifar10": ("cifar10", tuple(range(10))),
    "cifar10-0to4": ("cifar10", (0, 1, 2, 3, 4)),
    "cifar10-5to9": ("cifar10", (5, 6, 7, 8, 9)),
    "cifar100": ("cifar100", tuple(range(100))),
    "cifar100-coarse": ("cifar100-coarse", tuple(range(20))),
    "svhn": ("svhn", tuple(range(10))),
    **{f"{name}{part}": (name, classes) for name in ("mnist", "fashion-mnist", "kmnist")
       for part, classes in (("", tuple(range(10))), ("-0to4", (0, 1, 2, 3, 4)),
                             ("-5to9", (5, 6, 7, 8, 9)))},
}


def parse_image_folder(name: str) -> tuple[str, int | None]:
    """(directory, size or None) of an `imagefolder:<dir>[@<size>]` task name."""
    spec = name[len(IMAGEFOLDER):]
    path, sep, size = spec.rpartition("@")
    if not sep or not size.isdigit():
        path, size = spec, ""
    if not path:
        raise UserError(f"task {name!r} names no directory; use imagefolder:<dir> or "
                        "imagefolder:<dir>@<size>")
    if size and int(size) < 1:
        raise UserError(f"image size in task {name!r} must be >= 1")
    return path, int(size) if size else None


def check_task(name: str) -> None:
    """Raise `UserError` unless `name` is a task: one of `TASKS` or `imagefolder:<dir>[@N]`
    (whose directory is checked when it is loaded)."""
    if isinstance(name, str) and name.startswith(IMAGEFOLDER):
        parse_image_folder(name)
        return
    check_choice("task", name, [*TASKS, f"{IMAGEFOLDER}<dir>[@<size>]"])


@cache
def _dataset(name: str) -> ImageSet | tuple[ImageSet, ImageSet]:
    if name.startswith(IMAGEFOLDER):
        return image_folder(*parse_image_folder(name))
    return _DATASETS[name]()


def clear_caches() -> None:
    """Forget loaded data sets and tasks (e.g. after pointing $ROBUST_TRANSFER_DATA elsewhere)."""
    _dataset.cache_clear()
    load_task.cache_clear()


def _select(data: ImageSet, classes: tuple[int, ...]) -> ImageSet:
    """The examples of `classes`, relabelled 0..len(classes)-1 in that order."""
    wanted = torch.tensor(classes)
    keep = torch.isin(data.y, wanted)
    relabel = torch.full((int(max(data.y.max(), wanted.max())) + 1,), -1, dtype=torch.long)
    relabel[wanted] = torch.arange(len(classes))
    return ImageSet(data.x[keep], relabel[data.y[keep]])


def _split(data: ImageSet) -> tuple[ImageSet, ImageSet]:
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(len(data)), test_size=TEST_FRACTION, random_state=SPLIT_SEED,
        stratify=data.y.numpy(),
    )
    return data.subset(np.sort(train_idx)), data.subset(np.sort(test_idx))


@cache
def load_task(name: str) -> Task:
    """The task called `name` (see `TASKS`), with its fixed train/test split."""
    check_task(name)
    if name.startswith(IMAGEFOLDER):
        data = _dataset(name)
        labels = (data[0] if isinstance(data, tuple) else data).y
        dataset_name, classes = name, tuple(range(int(labels.max()) + 1))
    else:
        dataset_name, classes = TASKS[name]
    data = _dataset(dataset_name)
    if isinstance(data, tuple):
        train, test = (_select(part, classes) for part in data)
    else:
        train, test = _split(_select(data, classes))
    return Task(name=name, train=train, test=test, num_classes=len(classes), classes=classes)


ALL = "all"
Shots = int | Literal["all"]


def parse_shots(value: int | str | None) -> Shots:
    """Images per class from the user (CLI, YAML, a results table): the one parse.

    Returns a positive int, or the string "all" (None and any case of "all" also mean every
    image). Every layer keeps this one type, from the spec to the Parquet table and back.
    """
    if value is None:
        return ALL
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == ALL:
            return ALL
        if not text.isdigit():
            raise UserError(f"images per class must be a positive integer or 'all', got {value!r}")
        value = int(text)
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"images per class must be a positive integer or 'all', got {value!r}")
    return value


def max_shots(task: Task) -> int:
    """The most images per class a k-shot subset of `task` can have: its smallest class."""
    return int(torch.bincount(task.train.y, minlength=task.num_classes).min())


def check_shots(task: Task, k: int | str | None) -> Shots:
    """Parse `k` and check that every class of `task`'s training set has that many images."""
    k = parse_shots(k)
    if k != ALL and k > max_shots(task):
        counts = torch.bincount(task.train.y, minlength=task.num_classes)
        c = int(torch.argmin(counts))
        raise UserError(
            f"images per class {k} is more than class {c} of task {task.name!r} has "
            f"({int(counts[c])}); use at most {max_shots(task)} or 'all'"
        )
    return k


def shots_per_class(labels: torch.Tensor, k: int | str | None, seed: int) -> torch.Tensor:
    """Sorted indices of `k` examples per class drawn with `seed` (None or "all": every one).

    Raises `UserError` when some class has fewer than `k` examples.
    """
    k = parse_shots(k)
    if k == ALL:
        return torch.arange(len(labels))
    gen = np.random.default_rng(seed)
    y = labels.numpy()
    classes, counts = np.unique(y, return_counts=True)
    if k > counts.min():  # name the class that sets the limit: the smallest
        c, n = classes[counts.argmin()], counts.min()
        raise UserError(f"images per class {k} is more than class {c} has ({n}, the smallest "
                        f"class); use at most {n} or 'all'")
    chosen = []
    for c in classes:
        members = np.flatnonzero(y == c)
        chosen.append(gen.choice(members, size=k, replace=False))
    return torch.as_tensor(np.sort(np.concatenate(chosen)), dtype=torch.long)
