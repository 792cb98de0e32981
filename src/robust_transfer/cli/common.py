"""Small pieces every CLI module uses: progress bars, tables, device option."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)
out = Console()

DEVICE_OPTION = typer.Option("auto", "--device", help="auto | cpu | cuda")


@contextmanager
def progress_bars(totals: dict[str, int]) -> Iterator[dict]:
    """Rich progress bars, one per named total (done/total, elapsed, ETA), in one display.

    Yields {name: advance(n=1)}; bars with a zero total are not shown.
    """
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        advances = {}
        for name, total in totals.items():
            if total > 0:
                task = progress.add_task(name, total=total)
                advances[name] = lambda n=1, t=task: progress.advance(t, n)
            else:
                advances[name] = lambda n=1: None
        yield advances


@contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """One progress bar; yields `advance(n=1)`."""
    with progress_bars({description: total}) as advances:
        yield advances[description]


def _cell(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def print_table(title: str, rows: list[dict]) -> None:
    """Print dict rows as a table on stdout (floats to 4 digits, NaN as a dash)."""
    if not rows:
        return
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(str(key))
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    out.print(table)
