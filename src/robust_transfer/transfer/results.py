"""The results store: a Parquet table, one row per run per recorded epoch.

Each finished run is written as its own Parquet file under `results/` (temp name, then an
atomic rename), so a run is either wholly there or not at all: an interrupted grid (Ctrl-C,
kill -9) loses only the runs in flight, and the table is never corrupt.

The parts are the truth. `runs.json` lists the run ids of the spec the directory was last
run with; `read_results(out)` returns exactly that spec's finished runs, read from the parts
(runs of an earlier spec stay on disk but are not part of the table). `results.parquet` is a
convenience copy that `consolidate` writes at the end of a grid; it is used only while it
still matches the parts, so an interrupted grid never yields a stale table.

One writer per directory: `writer_lock(out)` holds an OS file lock (`flock`) on `out/.lock`
while a grid writes, so a second grid into the same directory is refused (one line naming
the holder's pid) before it touches anything; the lock dies with its process, so a kill -9
leaves no stale lock. Readers take no lock: every file is replaced atomically, so a reader
sees each file wholly old or wholly new.

A part that cannot be read (truncated, bytes overwritten: parts carry Parquet page
checksums) is corrupt, not finished: the grid re-runs its run, and reading the table names
the file instead of quietly leaving the run out.

`images_per_class` is an int or "all" in memory (`data.tasks.parse_shots`); Parquet cannot
hold that mixed column, so it is stored as text and parsed back on reading, by the same parse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from robust_transfer.atomic import atomic_path, atomic_write_text
from robust_transfer.data.tasks import parse_shots
from robust_transfer.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder then has no writer lock
    fcntl = None

PARTS = "results"
TABLE = "results.parquet"
MANIFEST = "runs.json"
LOCK = ".lock"
# Columns the report needs; a part without them (an older format) is not a finished run.
REQUIRED_COLUMNS = (
    "run_id", "source_task", "source_arch", "source_recipe", "source_eps", "source_norm",
    "target_task", "target_classes", "images_per_class", "unfrozen_blocks", "epochs", "lr",
    "batch_size", "epoch", "seed", "train_images", "test_accuracy",
)
SHOTS = "images_per_class"


def part_files(parts: Path) -> list[Path]:
    """The stored runs' Parquet files, sorted; an unfinished write (a hidden temporary file
    that a kill -9 left behind) is not a run."""
    return sorted(p for p in Path(parts).glob("*.parquet") if not p.name.startswith("."))


def read_part(part: Path) -> pa.Table:
    """One stored run's rows, with the page checksums verified; `UserError` naming the file
    if it cannot be read (a truncated or overwritten part is not a finished run)."""
    try:
        return pq.ParquetFile(part, page_checksum_verification=True).read()
    except Exception as e:  # pyarrow raises several types for a damaged file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"corrupt results part {str(part)!r} ({first}); re-run the grid with "
                        "the same spec and --out to re-run that run") from None


def _is_current(table: pa.Table, required: tuple[str, ...] = REQUIRED_COLUMNS) -> bool:
    return all(c in table.column_names for c in required)


@dataclass
class PartScan:
    """What a directory's parts hold: ids of finished runs in the current format, and the
    parts that cannot be read (their runs are not finished)."""

    done: set[str] = field(default_factory=set)
    corrupt: list[Path] = field(default_factory=list)


def scan_parts(out: Path, run_ids: set[str] | None = None,
               required: tuple[str, ...] = REQUIRED_COLUMNS) -> PartScan:
    """Read every stored part (of `run_ids`, if given) under `out`: which runs are finished,
    which parts are corrupt. A part written by an older version, without the `required`
    columns (the grid's: those the report pairs on), is neither: its run is re-run."""
    scan = PartScan()
    for part in part_files(Path(out) / PARTS):
        if run_ids is not None and part.stem not in run_ids:
            continue
        state = _part_state(part, tuple(required))
        if state == "corrupt":
            scan.corrupt.append(part)
        elif state == "done":
            scan.done.add(part.stem)
    return scan


# A part's state by (path, mtime, size): reading 14,400 parts in full takes seconds, and the
# CLI plans a grid twice (to print what is left, then to run it); a changed file is re-read.
_states: dict[tuple[Path, tuple[str, ...]], tuple[int, int, str]] = {}


def _part_state(part: Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> str:
    """"done", "old" (written by an older version) or "corrupt"."""
    st = part.stat()
    cached = _states.get((part, required))
    if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
        return cached[2]
    try:
        state = "done" if _is_current(read_part(part), required) else "old"
    except UserError:
        state = "corrupt"
    _states[(part, required)] = (st.st_mtime_ns, st.st_size, state)
    return state


def done_run_ids(out: Path) -> set[str]:
    """Ids of the runs whose rows are stored under `out`, readable and in the current
    format (a corrupt part, or one written by an older version, is re-run)."""
    return scan_parts(out).done


_held: dict[Path, int] = {}  # directories this process holds the writer lock of: depth


@contextmanager
def writer_lock(out: str | Path) -> Iterator[None]:
    """Be the one writer of results directory `out` for the block (created if missing).

    An exclusive `flock` on `out/.lock`, which holds the holder's pid as text; another
    process asking for it gets a `UserError` naming the directory and that pid, having
    changed nothing. Re-entrant within a process (the CLI takes it before planning, the grid
    again to write). The OS drops the lock when its process dies, however it dies.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if out in _held or fcntl is None:
        _held[out] = _held.get(out, 0) + 1
        try:
            yield
        finally:
            _held[out] -= 1
            if fcntl is None and not _held[out]:
                del _held[out]
        return
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{str(out)!r} is in use by another writer (pid "
                            f"{_lock_holder(path)}); wait for it to finish, or give another "
                            "--out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the last holder removed it as we locked it: lock anew
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[out] = 1
        yield
    finally:
        _held.pop(out, None)
        try:
            os.remove(path)  # while still holding it: the next writer re-checks the inode
        finally:
            os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def append_run(out: Path, run_id: str, rows: list[dict]) -> None:
    """Store one finished run's rows, atomically.

    Written with pyarrow directly (a third of the time of going through pandas, which
    matters at 14,400 parts): the same column types as a pandas-written part read back.
    Every column of every row is kept (a row without one, e.g. an epoch before a run's final
    measurements, holds null there, read back as NaN): pyarrow would take the columns from
    the first row alone.
    """
    rows = [{**row, SHOTS: str(row[SHOTS])} if SHOTS in row else row for row in rows]
    names = list(dict.fromkeys(key for row in rows for key in row))
    rows = [{k: row.get(k) for k in names} for row in rows]
    table = pa.Table.from_pylist(rows)
    table = table.cast(pa.schema([pa.field(f.name, pa.string()) if f.type == pa.large_string()
                                  else f for f in table.schema]))
    with atomic_path(Path(out) / PARTS / f"{run_id}.parquet") as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)


def write_manifest(out: Path, run_ids: list[str]) -> None:
    """Record which runs make up the directory's current spec."""
    atomic_write_text(Path(out) / MANIFEST, json.dumps({"run_ids": sorted(set(run_ids))}))


def manifest_run_ids(out: Path) -> set[str] | None:
    """The current spec's run ids, or None when the directory has no manifest."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        return set(json.loads(path.read_text())["run_ids"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"corrupt run list {str(path)!r}; re-run the grid to rewrite it") from None


def consolidate(out: Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> Path:
    """Write the current spec's stored runs as one `results.parquet` in `out`; its path."""
    df = read_results(out, required)
    table = Path(out) / TABLE
    with atomic_path(table) as tmp:
        _to_parquet(df, tmp)
    return table


def _to_parquet(df: pd.DataFrame, path: Path) -> None:
    df = df.copy()
    if SHOTS in df.columns:
        df[SHOTS] = df[SHOTS].map(str)
    df.to_parquet(path, index=False)


def _read_parquet(files: list[Path]) -> pd.DataFrame:
    return _concat([pq.read_table(f) for f in files])


def _concat(tables: list[pa.Table]) -> pd.DataFrame:
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def _grid_table(out: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """The current spec's finished runs in grid directory `out`, read from its parts (or from
    `results.parquet` while that holds exactly those runs and is newer than all of them).
    A corrupt part is a `UserError` naming it: the table without that run is not the truth."""
    wanted = manifest_run_ids(out)
    candidates = [p for p in part_files(out / PARTS) if wanted is None or p.stem in wanted]
    table = out / TABLE
    if candidates and table.is_file() and \
            table.stat().st_mtime >= max(p.stat().st_mtime for p in candidates):
        ids = set(pq.read_table(table, columns=["run_id"]).column("run_id").to_pylist())
        if ids == {p.stem for p in candidates} and \
                all(_schema_ok(p, required) for p in candidates):
            return _read_parquet([table])
    tables = [t for t in map(read_part, candidates) if _is_current(t, required)]
    if not tables:
        what = "of its current spec " if wanted is not None else ""
        why = ("only runs stored by an older version, which the grid re-runs" if candidates
               else "run `robust-transfer grid` first")
        raise UserError(f"no results in {str(out)!r}: no finished runs {what}yet ({why})")
    return _concat(tables)


def _schema_ok(part: Path, required: tuple[str, ...]) -> bool:
    """The part's footer reads and has the current columns (the cheap check the table copy
    needs: a part changed after the copy was written is newer than it, and read in full)."""
    try:
        names = pq.read_schema(part).names
    except Exception:
        read_part(part)  # names the corrupt file
        raise
    return all(c in names for c in required)


def read_results(path: str | Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> pd.DataFrame:
    """Load a results table: a study's out dir, its `results/` directory, or a Parquet file.

    A study directory (or its `results.parquet`) gives the finished runs of the spec it was
    last run with, never a stale copy. `images_per_class` comes back as int or "all".
    `required`: the columns the study's table must have (default: the grid's).
    Raises `UserError` if it is missing, unreadable, or not one of ours.
    """
    path = Path(path)
    if path.is_file() and path.name == TABLE and (path.parent / PARTS).is_dir():
        path = path.parent  # the grid's own table: read what is current, not the copy
    if not path.exists():
        raise UserError(f"no results at {str(path)!r}: expected a results.parquet or a grid dir")
    try:
        if path.is_dir() and (path / PARTS).is_dir():
            df = _grid_table(path, tuple(required))
        elif path.is_dir() and (path / TABLE).is_file():
            df = _read_parquet([path / TABLE])
        elif path.is_dir():
            files = part_files(path)
            if not files:
                raise UserError(f"no results in {str(path)!r}: the directory holds no runs")
            df = _concat([read_part(f) for f in files])  # a corrupt part is named
        else:
            df = _read_parquet([path])
    except UserError:
        raise
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read results {str(path)!r}: not a Parquet table ({first})"
                        ) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(
            f"{str(path)!r} is not a robust_transfer results table of this version: missing "
            f"column {missing[0]!r} (re-run the grid to rewrite older results)"
        )
    if SHOTS in df.columns:
        df[SHOTS] = df[SHOTS].map(parse_shots).astype(object)
    return df
