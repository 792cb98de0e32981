"""Writing figures and tables: atomically, and closing the figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from robust_transfer.atomic import atomic_path  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 130) -> Path:
    """Save `fig` to `path` atomically, then close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def save_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a tidy table as Parquet atomically (figures can be re-made from it)."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return Path(path)
