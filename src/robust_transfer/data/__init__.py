"""Datasets, class-split tasks and reproducible k-shot subsets."""

from robust_transfer.data.datasets import ImageSet, adapt_images, digits, synthetic
from robust_transfer.data.tasks import TASKS, Task, check_task, load_task, shots_per_class

__all__ = ["ImageSet", "adapt_images", "digits", "synthetic", "TASKS", "Task", "check_task",
           "load_task", "shots_per_class"]
