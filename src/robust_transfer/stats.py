"""The confidence interval every layer reports: a Student t-interval.

With 3-10 seeds (or a few hundred images), mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) is
steadier than a bootstrap (REFERENCES.md, Reporting); n is always reported with it.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def t_interval(values, level: float = 0.95, axis: int = 0):
    """(mean, half-width, n) along `axis`; the half-width is NaN where n < 2."""
    v = np.asarray(values, dtype=float)
    n = v.shape[axis]
    mean = v.mean(axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan), n
    return mean, t_half_width(v.std(axis, ddof=1), n, level), n


def t_half_width(sd, n: int, level: float = 0.95):
    """The t-interval's half-width from a sample's standard deviation (ddof=1) and size:
    for intervals rebuilt from stored (mean, sd, n) summaries; NaN where n < 2."""
    if n < 2:
        return np.full_like(np.asarray(sd, dtype=float), np.nan)
    return stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)
