"""Writing figures and tables: atomically, and closing the figure; a shared legend."""

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


def legend_below(fig, axes, ncol: int) -> int:
    """One figure legend under the panels, so that no curve hides under it: every distinct
    label of `axes`, in the order first seen. Returns the number of entries (to size the
    bottom margin)."""
    entries: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="lower center",
               ncol=min(ncol, len(entries)), fontsize=9, bbox_to_anchor=(0.5, 0.0))
    return len(entries)


def save_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a tidy table as Parquet atomically (figures can be re-made from it)."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return Path(path)
