"""Datasets, class-split tasks and reproducible k-shot subsets."""

from robust_transfer.data.datasets import ImageSet, digits, synthetic
from robust_transfer.data.tasks import TASKS, Task, load_task, shots_per_class

__all__ = ["ImageSet", "digits", "synthetic", "TASKS", "Task", "load_task", "shots_per_class"]
