"""Small pieces every CLI module uses: progress bars, tables, device option, output checks."""

from __future__ import annotations

import functools
import inspect
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.measure import Measurement
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
from robust_transfer.models.card import SourceCard
from robust_transfer.models.checkpoint import META, WEIGHTS
from robust_transfer.plugins import Registry

console = Console(stderr=True)
out = Console()

DEVICE_OPTION = typer.Option("auto", "--device", help="auto | cpu | cuda")


def plugin_options_flag(flag: str, what: str, *registries: Registry) -> typer.models.OptionInfo:
    """A repeatable `flag KEY=VALUE` (read with `plugins.parse_assignments`) whose help lists
    every option of the `registries`' plugins, from their `Options` dataclasses."""
    listed = ". ".join(line for r in registries for line in r.options_help().splitlines())
    return typer.Option(None, flag, help=f"KEY=VALUE, repeatable (VALUE read as YAML): an "
                        f"option of {what}. {listed}.")


def with_options(extra: dict[str, tuple[Any, typer.models.OptionInfo]], into: str,
                 make: Callable[[dict[str, Any]], Any]) -> Callable[[Callable], Callable]:
    """Decorator for a command: adds the typer options `extra` (parameter name -> (type,
    option)) after the command's own, and hands their values to it as one keyword argument
    `into`, built by `make(values by parameter name)`. Options several commands share, or
    options declared elsewhere (a plugin's `Options`), are then written once. Put it below
    `@app.command`."""

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != into]
        clash = {p.name for p in own} & set(extra)
        if clash:
            raise TypeError(f"{fn.__name__}: {', '.join(sorted(clash))} is added by the "
                            "decorator; drop it from the command")
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                   default=option) for name, (kind, option) in extra.items()]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            values = {name: kwargs.pop(name) for name in extra}
            return fn(**kwargs, **{into: make(values)})

        params = [*own, *added]
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def split_values(values: list[str] | None) -> list[str]:
    """The values of a repeatable option that also takes comma-separated lists
    (`--x a,b --x c` -> [a, b, c]), stripped, empty ones dropped, in order."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


# Room left under an output directory for the names written inside it (sources/<id>/...).
INNER_ROOM = 255


def _shown(path: Path) -> str:
    text = str(path)
    return repr(text if len(text) <= 120 else f"{text[:60]}...{text[-40:]}")


def _limit(directory: Path, name: str, fallback: int) -> int:
    try:
        return os.pathconf(directory, name)
    except (OSError, ValueError):
        return fallback


def check_output_dir(path: Path, what: str = "--out") -> None:
    """Refuse an output directory that cannot be written: one that exists as something else
    (a file, a broken link), a name longer than the file system allows (a component, or the
    whole path with room for the files inside), or a place where no file can be created
    (checked by creating and removing a probe file: read-only, /proc, permissions).

    Every command that writes calls this before any work starts, so a bad `--out` costs
    nothing and is one line instead of an OSError traceback after the training has run.
    """
    path = Path(path)
    root = Path(os.path.abspath(path)).anchor  # limits checked before any stat: a too-long
    name_max = _limit(root, "PC_NAME_MAX", 255)  # name makes stat itself fail
    long = next((part for part in path.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None:
        raise UserError(f"{what} {_shown(path)} has a name of {len(os.fsencode(long))} bytes; "
                        f"this file system allows {name_max}")
    path_max = _limit(root, "PC_PATH_MAX", 4096)
    length = len(os.fsencode(os.path.abspath(path)))
    if length > path_max - INNER_ROOM:
        raise UserError(f"{what} {_shown(path)} is {length} bytes long; this file system allows "
                        f"{path_max}, and the files written inside need up to {INNER_ROOM} more")
    if not path.is_dir() and (path.exists() or path.is_symlink()):
        raise UserError(f"{what} {_shown(path)} exists and is not a directory; "
                        "give a new directory or an existing one")
    parent = path if path.is_dir() else next(
        (p for p in path.parents if p.exists() or p.is_symlink()), Path("."))
    if not parent.is_dir():
        raise UserError(f"{what} {_shown(path)} cannot be created: {_shown(parent)} is not a "
                        "directory")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{what} {_shown(path)} is not writable: cannot create a file in "
                        f"{_shown(parent)} ({e.strerror})") from None


def checkpoint_task(card: SourceCard, task: str | None, checkpoint: Path) -> str:
    """The task to run a checkpoint on: `--task` if given, else the one its card records
    (digits-0to4 for a card without one). An imported checkpoint records no task
    (`task: ""`): then `--task` is needed, and the error says so."""
    if task:
        return task
    recorded = "digits-0to4" if card.task is None else card.task
    if not recorded:
        raise UserError(f"checkpoint {str(checkpoint)!r} records no task (an imported "
                        "checkpoint); pass --task")
    return recorded


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


OUTPUT_KINDS = {".png": "figure", ".pdf": "figure", ".md": "summary", ".csv": "table",
                ".parquet": "table"}


def print_outputs(files) -> None:
    """One line per file a report wrote, named by its kind (figure, summary, table)."""
    for f in files:
        console.print(f"{OUTPUT_KINDS.get(Path(f).suffix, 'file')}: {f}", soft_wrap=True)


def _cell(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def print_table(title: str, rows: list[dict]) -> None:
    """Print dict rows as a table on stdout (floats to 4 digits, NaN as a dash).

    A number is never split across lines: number columns do not wrap. When stdout is not a
    terminal (a file, a pipe) there is no width to fit, so the table gets the width it needs
    instead of folding at 80 columns.
    """
    if not rows:
        return
    cells = [[_cell(v) for v in row.values()] for row in rows]
    table = Table(title=title)
    for i, key in enumerate(rows[0]):
        column = [row[i] for row in cells]
        numbers = all(_is_number(c) or c == "–" for c in column)
        # fold a long word, never cut it; a number is kept whole
        table.add_column(str(key), overflow="fold", no_wrap=numbers,
                         min_width=max(map(len, column)) if numbers else None)
    for row in cells:
        table.add_row(*row)
    if out.is_terminal:
        out.print(table)
        return
    needed = Measurement.get(out, out.options.update_width(10**5), table).maximum
    Console(width=max(out.width, needed), file=out.file).print(table)
