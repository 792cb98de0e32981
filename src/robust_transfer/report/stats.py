"""Confidence intervals over seeds, per group of a results table (see `robust_transfer.stats`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from robust_transfer.stats import t_interval


def summarise(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """One row per group of `by`: mean, ci (95% t half-width; NaN if n < 2), n of the non-NaN
    `value`s."""
    rows = []
    for key, group in df.groupby(by, sort=True, dropna=False):
        v = group[value].dropna().to_numpy(dtype=float)
        mean, half, n = t_interval(v) if len(v) else (np.nan, np.nan, 0)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)),
                     "mean": float(mean), "ci": float(half), "n": n})
    return pd.DataFrame(rows)
