"""Small pieces every CLI module uses: progress bars, tables, device option, output checks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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

from robust_transfer.errors import UserError
from robust_transfer.models.checkpoint import META, WEIGHTS

console = Console(stderr=True)
out = Console()

DEVICE_OPTION = typer.Option("auto", "--device", help="auto | cpu | cuda")


def split_values(values: list[str] | None) -> list[str]:
    """The values of a repeatable option that also takes comma-separated lists
    (`--x a,b --x c` -> [a, b, c]), stripped, empty ones dropped, in order."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def check_output_dir(path: Path, what: str = "output") -> None:
    """Refuse an output directory that exists as something else (a file, a broken link).

    Every command calls this before any work starts, so a bad `--out` costs nothing and is one
    line instead of a FileExistsError traceback after the training has run.
    """
    path = Path(path)
    if path.is_dir():
        return
    if path.exists() or path.is_symlink():
        raise UserError(f"{what} {str(path)!r} exists and is not a directory; "
                        "give a new directory or an existing one")
    parent = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is not a "
                        "directory")


def check_checkpoint_out(path: Path | None, overwrite: bool, what: str = "--out") -> None:
    """Refuse to replace a checkpoint silently: `path` must not hold one unless `overwrite`.

    Called before training, so a refused `--out` costs nothing.
    """
    if path is None:
        return
    check_output_dir(path, what)
    if not overwrite and any((Path(path) / name).exists() for name in (WEIGHTS, META)):
        raise UserError(f"{what} {str(path)!r} already holds a checkpoint; pass --overwrite to "
                        "replace it, or choose another directory")


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
        table.add_column(str(key), overflow="fold")  # fold a long word, never cut it
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    out.print(table)
