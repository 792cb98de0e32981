"""Intra-op threads per worker: the one rule every executor (`executors`, `ray_executor`)
applies, kept apart from both so that neither imports the other's module for it."""

from __future__ import annotations

import os


def worker_threads(workers: int) -> int:
    """Intra-op threads per worker when `workers` share this machine's cores. Every executor
    uses it: CPU float sums depend on the thread count, so equal counts give equal numbers."""
    return max(1, (os.cpu_count() or 1) // max(1, int(workers)))
