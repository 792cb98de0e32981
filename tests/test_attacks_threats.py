"""Threat models: the L1 projection is exact (with the [0,1] box); steps and starts stay in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from robust_transfer.attacks import L1Threat, make_threat
from robust_transfer.attacks.threats import project_l1_box
from robust_transfer.errors import UserError


def bisection_projection(z: np.ndarray, lo: np.ndarray, hi: np.ndarray, eps: float):
    """Independent solve: d_i(lam) = clip(soft-threshold(z_i, lam), lo_i, hi_i); bisect lam."""

    def d(lam):
        return np.clip(np.sign(z) * np.maximum(np.abs(z) - lam, 0), lo, hi)

    if np.abs(d(0.0)).sum() <= eps:
        return d(0.0)
    a, b = 0.0, np.abs(z).max()
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if np.abs(d(mid)).sum() > eps else (a, mid)
    return d(b)


def qp_projection(z, lo, hi, eps):
    """Independent solve 2: the smooth QP in (u, v) >= 0, d = u - v, with SLSQP."""
    n = len(z)

    def f(w):
        return ((w[:n] - w[n:] - z) ** 2).sum()

    def g(w):
        r = 2 * (w[:n] - w[n:] - z)
        return np.concatenate([r, -r])

    bounds = [(0, max(h, 0)) for h in hi] + [(0, max(-lo_i, 0)) for lo_i in lo]
    cons = [{"type": "ineq", "fun": lambda w: eps - w.sum(), "jac": lambda w: -np.ones(2 * n)}]
    res = minimize(f, np.zeros(2 * n), jac=g, bounds=bounds, constraints=cons,
                   method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    return res.x[:n] - res.x[n:]


def test_l1_projection_matches_independent_solvers():
    gen = torch.Generator().manual_seed(0)
    n, d = 40, 6
    x = torch.rand(n, d, generator=gen, dtype=torch.float64)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.8
    x[:5, :3] = 0.0  # pixels on the box boundary
    x[5:10, :3] = 1.0
    for eps in (0.05, 0.5, 1.5, 10.0):
        p = project_l1_box(z, -x, 1 - x, eps).numpy()
        for i in range(n):
            zi, lo, hi = z[i].numpy(), -x[i].numpy(), 1 - x[i].numpy()
            ref = bisection_projection(zi, lo, hi, eps)
            np.testing.assert_allclose(p[i], ref, atol=1e-9)
            assert np.abs(p[i]).sum() <= eps + 1e-9
            assert (p[i] >= lo - 1e-12).all() and (p[i] <= hi + 1e-12).all()
        for i in range(4):  # smooth QP solve on a few rows
            np.testing.assert_allclose(
                p[i], qp_projection(z[i].numpy(), -x[i].numpy(), 1 - x[i].numpy(), eps),
                atol=1e-5)


def test_l1_projection_is_not_rescaling():
    # z = (1, 0.1), no box: projection onto the unit L1 ball is (1, 0) shifted by lam, which
    # is (0.95, 0.05); rescaling would give (0.909, 0.0909).
    z = torch.tensor([[1.0, 0.1]], dtype=torch.float64)
    box = torch.full_like(z, 10.0)
    p = project_l1_box(z, -box, box, 1.0)
    torch.testing.assert_close(p, torch.tensor([[0.95, 0.05]], dtype=torch.float64))


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_random_start_step_project_stay_inside(norm):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    threat = make_threat(norm, 0.7)
    x0 = threat.random_start(x, gen)
    assert (threat.distance(x0, x) <= 0.7 + 1e-5).all()
    assert x0.min() >= 0 and x0.max() <= 1 and not torch.equal(x0, x)
    stepped = threat.step(x0, torch.randn(x.shape, generator=gen), 0.5)
    x1 = threat.project(stepped, x)
    assert (threat.distance(x1, x) <= 0.7 + 1e-5).all()
    assert x1.min() >= 0 and x1.max() <= 1


def test_l1_step_is_sparse_and_has_l1_size_alpha():
    threat = L1Threat(1.0, sparsity=0.1)
    x = torch.full((3, 1, 8, 8), 0.5)
    grad = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    step = threat.step(x, grad, 0.3) - x
    flat = step.flatten(1)
    assert ((flat != 0).sum(1) == round(0.1 * 64)).all()
    torch.testing.assert_close(flat.abs().sum(1), torch.full((3,), 0.3))
    top = grad.flatten(1).abs().topk(6, dim=1).indices
    assert (flat.gather(1, top) != 0).all()
    # coordinates the box blocks get no share of the step
    x_edge = x.clone()
    x_edge.view(3, -1)[:, :] = torch.where(grad.flatten(1) > 0, 1.0, 0.0)
    assert torch.equal(threat.step(x_edge, grad, 0.3), x_edge)


def test_bad_eps_and_norm():
    with pytest.raises(UserError, match="eps"):
        make_threat("l1", -0.1)
    with pytest.raises(UserError, match="l1"):
        make_threat("l3", 0.1)
