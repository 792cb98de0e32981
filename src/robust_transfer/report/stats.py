"""Confidence intervals over seeds.

With 3-10 seeds a Student t-interval, mean +- t_{0.975, n-1} * sd / sqrt(n), is steadier than
a bootstrap (REFERENCES.md, Reporting); n is always reported with it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width, n) of the t-interval; half-width is NaN when n < 2."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n < 2:
        return float(v.mean()), float("nan"), 1
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / np.sqrt(n)
    return float(v.mean()), float(half), n


def summarise(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """One row per group of `by`: mean, ci (half-width), n of `value`."""
    rows = []
    for key, group in df.groupby(by, sort=True, dropna=False):
        mean, half, n = t_interval(group[value])
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)),
                     "mean": mean, "ci": half, "n": n})
    return pd.DataFrame(rows)
