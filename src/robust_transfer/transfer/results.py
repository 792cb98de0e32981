"""The results store: a Parquet table, one row per run per recorded epoch.

Each finished run is written as its own Parquet file under `results/` (temp name, then an
atomic rename), so a run is either wholly there or not at all: an interrupted grid (Ctrl-C,
kill -9) loses only the runs in flight, and the table is never corrupt. The directory is a
Parquet dataset; `consolidate` also writes it as one `results.parquet` for convenience.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from robust_transfer.atomic import atomic_path
from robust_transfer.errors import UserError

PARTS = "results"
TABLE = "results.parquet"
REQUIRED_COLUMNS = (
    "run_id", "source_eps", "source_norm", "target_task", "images_per_class",
    "unfrozen_blocks", "epoch", "seed", "lr", "test_accuracy",
)


def part_files(parts: Path) -> list[Path]:
    """The stored runs' Parquet files, sorted; an unfinished write (a hidden temporary file
    that a kill -9 left behind) is not a run."""
    return sorted(p for p in Path(parts).glob("*.parquet") if not p.name.startswith("."))


def done_run_ids(out: Path) -> set[str]:
    """Ids of the runs whose rows are already stored under `out`."""
    return {p.stem for p in part_files(Path(out) / PARTS)}


def append_run(out: Path, run_id: str, rows: list[dict]) -> None:
    """Store one finished run's rows, atomically."""
    with atomic_path(Path(out) / PARTS / f"{run_id}.parquet") as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)


def consolidate(out: Path) -> Path:
    """Write every stored run as one `results.parquet` in `out`; return its path."""
    df = read_results(Path(out) / PARTS)
    with atomic_path(Path(out) / TABLE) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(out) / TABLE


def read_results(path: str | Path) -> pd.DataFrame:
    """Load a results table: a `results.parquet`, a `results/` directory, or a grid's out dir.

    Raises `UserError` if it is missing, unreadable, or not one of ours.
    """
    path = Path(path)
    if path.is_dir() and (path / TABLE).is_file():
        path = path / TABLE
    elif path.is_dir() and (path / PARTS).is_dir():
        path = path / PARTS
    if not path.exists():
        raise UserError(f"no results at {str(path)!r}: expected a results.parquet or a grid dir")
    try:
        if path.is_dir():
            files = part_files(path)
            if not files:
                raise UserError(f"no results in {str(path)!r}: the directory holds no runs")
            df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        else:
            df = pd.read_parquet(path)
    except UserError:
        raise
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"cannot read results {str(path)!r}: not a Parquet table ({e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(
            f"{str(path)!r} is not a robust_transfer results table: missing column {missing[0]!r}"
        )
    return df
