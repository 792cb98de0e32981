"""Small pieces every CLI module uses: progress bars, tables, device option."""

from __future__ import annotations

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
def progress_bar(description: str, total: int) -> Iterator:
    """A rich progress bar (done/total, elapsed, ETA); yields `advance(n=1)`."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def print_table(title: str, rows: list[dict]) -> None:
    """Print dict rows as a table on stdout (floats to 4 digits)."""
    if not rows:
        return
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(str(key))
    for row in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
    out.print(table)
