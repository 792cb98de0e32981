"""Shared test helpers for grids: an in-process executor that records its work units."""

from __future__ import annotations


class RecordingExecutor:
    """Runs each work unit in this process, in order, and records the units it was given
    (the executor interface of `transfer.executors.LocalExecutor`); a `runner` work unit is
    recorded as the job it carries (a grid's `_FinetuneBatch`, a source's `SourceJob`)."""

    def __init__(self):
        self.units = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def map_unordered(self, fn, items):
        for item in items:
            self.units.append(getattr(item, "job", item))
            yield item, fn(item)
