"""Threat models: the L1 projection is exact (with the [0,1] box); steps and starts stay in;
starts are drawn per example; the geometry APGD, Square and the universal perturbation use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from robust_transfer.attacks import L1Threat, make_threat
from robust_transfer.attacks.rng import ExampleRNG
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
    rng = ExampleRNG.for_inputs(x, 0)
    for start in (threat.random_start(x, rng, 0), threat.surface_start(x, rng, 0)):
        assert (threat.distance(start, x) <= 0.7 + 1e-5).all()
        assert start.min() >= 0 and start.max() <= 1 and not torch.equal(start, x)
        stepped = threat.step(start, torch.randn(x.shape, generator=gen), 0.5)
        x1 = threat.project(stepped, x)
        assert (threat.distance(x1, x) <= 0.7 + 1e-5).all()
        assert x1.min() >= 0 and x1.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("kind", ["random_start", "surface_start"])
def test_starts_are_per_example_and_keyed_by_counter(norm, kind):
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    start = getattr(make_threat(norm, 0.5), kind)
    rng = ExampleRNG.for_inputs(x, 7)
    batch = start(x, rng, 2)
    # the same examples alone, or as a subset of the streams, get the same starts
    torch.testing.assert_close(start(x[4:8], ExampleRNG.for_inputs(x[4:8], 7), 2), batch[4:8],
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(start(x[4:8], rng[4:8], 2), batch[4:8], atol=0, rtol=0)
    assert torch.equal(start(x, rng, 2), batch)  # same counter: same numbers
    assert not torch.equal(start(x, rng, 3), batch)  # another counter (restart): fresh ones
    assert not torch.equal(start(x, ExampleRNG.for_inputs(x, 8), 2), batch)  # another seed
    with pytest.raises(TypeError, match="ExampleRNG"):
        start(x, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_surface_start_is_on_the_sphere(norm):
    # mid-grey images and a small eps: the box never binds, so the start is at distance eps
    x = torch.full((6, 3, 4, 4), 0.5) + torch.arange(6.0).view(-1, 1, 1, 1) * 0.01
    threat = make_threat(norm, 0.2)
    x0 = threat.surface_start(x, ExampleRNG.for_inputs(x, 0), 0)
    torch.testing.assert_close(threat.distance(x0, x), torch.full((6,), 0.2), atol=1e-5, rtol=0)
    if norm == "l1":  # APGD-L1's start: a projected Gaussian, sparse (soft-thresholded)
        assert ((x0 - x).flatten(1) == 0).float().mean() > 0.5
    # random_start is uniform in the ball, mostly inside (Linf: per coordinate)
    inner = threat.distance(threat.random_start(x, ExampleRNG.for_inputs(x, 0), 0), x)
    assert (inner < 0.2 - 1e-3).any()


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_to_surface_and_project_delta(norm):
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    v[0] *= 1e-3  # inside the ball: projection leaves it alone
    threat = make_threat(norm, 0.6)
    size = threat.distance(threat.to_surface(v), torch.zeros_like(v))
    torch.testing.assert_close(size, torch.full((5,), 0.6, dtype=torch.float64))
    p = threat.project_delta(v)
    torch.testing.assert_close(p[0], v[0])
    assert (threat.distance(p, torch.zeros_like(p)) <= 0.6 + 1e-9).all()
    torch.testing.assert_close(threat.project_delta(p), p)  # idempotent
    # the Euclidean projection: no point of the ball is closer to v (random ball points)
    rng = ExampleRNG.for_inputs(v, 0)
    for counter in range(20):
        q = threat.to_surface(rng.normal(v.shape[1:], counter, dtype=v.dtype))
        q = q * rng.uniform((1, 1, 1), counter, 9, dtype=v.dtype)
        assert ((v - p).flatten(1).norm(dim=1) <= (v - q).flatten(1).norm(dim=1) + 1e-9).all()
    if norm == "linf":
        torch.testing.assert_close(p, v.clamp(-0.6, 0.6))
    if norm == "l1":  # no box: soft-thresholding, as the independent bisection solve
        for i in range(1, 5):
            zi = v[i].flatten().numpy()
            ref = bisection_projection(zi, np.full_like(zi, -np.inf), np.full_like(zi, np.inf),
                                       0.6)
            np.testing.assert_allclose(p[i].flatten().numpy(), ref, atol=1e-9)


def test_l1_sparse_step_takes_a_per_example_count():
    threat = L1Threat(1.0)
    x = torch.full((3, 1, 8, 8), 0.5)
    grad = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    k = torch.tensor([1, 5, 13])
    alpha = torch.tensor([0.1, 0.2, 0.3]).view(-1, 1, 1, 1)
    step = (threat.sparse_step(x, grad, alpha, k) - x).flatten(1)
    assert (step != 0).sum(1).tolist() == [1, 5, 13]
    torch.testing.assert_close(step.abs().sum(1), alpha.flatten())
    for i in range(3):  # the nonzero coordinates are each example's top-k by |grad|
        top = grad[i].flatten().abs().topk(int(k[i])).indices
        assert (step[i, top] != 0).all()
        assert torch.equal(step[i, top].sign(), grad[i].flatten()[top].sign())


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
    # `--eps inf` trained with NaN losses: infinite and NaN radii are rejected by value
    for bad in (float("inf"), float("nan"), "inf", "big"):
        with pytest.raises(UserError, match=f"eps must be >= 0 and finite, got .*{bad}"):
            make_threat("l2", bad)
    assert make_threat("linf", 0).eps == 0.0
