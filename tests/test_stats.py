import numpy as np
import pytest
from scipy import stats

from robust_transfer.stats import t_interval


def test_t_interval_matches_scipy_and_is_vectorised():
    values = np.random.default_rng(0).normal(size=(6, 3))
    mean, half, n = t_interval(values)
    for j in range(3):
        lo, hi = stats.t.interval(0.95, 5, loc=values[:, j].mean(),
                                  scale=stats.sem(values[:, j]))
        assert mean[j] == pytest.approx((lo + hi) / 2) and half[j] == pytest.approx((hi - lo) / 2)
    assert n == 6


def test_one_value_has_no_interval():
    mean, half, n = t_interval(np.array([0.7]))
    assert mean == 0.7 and np.isnan(half) and n == 1
