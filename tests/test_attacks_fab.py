"""FAB / FAB-T (Croce & Hein 2020): the exact hyperplane-and-box projection, minimal norms no
larger than DeepFool's, the calling convention, batch independence, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from torch import nn

from attack_fixtures import digits_batch, fresh, natural_model
from robust_transfer.attacks import DeepFool
from robust_transfer.attacks.fab import FAB, FABT, project_hyperplane_box
from robust_transfer.errors import UserError


def _size(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    p = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}[norm]
    return (x_adv - x).flatten(1).norm(p=p, dim=1)


def _predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def _reference_projection(p: np.ndarray, w: np.ndarray, b: float, norm: str) -> float | None:
    """min ||d|| s.t. w.(p + d) = b, 0 <= p + d <= 1, by a generic solver (None: infeasible)."""
    d_dim, c = len(p), b - w @ p
    box = list(zip(-p, 1 - p, strict=True))
    if norm == "l2":
        res = minimize(lambda d: d @ d, np.zeros(d_dim), jac=lambda d: 2 * d, method="SLSQP",
                       bounds=box, options={"ftol": 1e-15, "maxiter": 500},
                       constraints=[{"type": "eq", "fun": lambda d: w @ d - c,
                                     "jac": lambda d: w}])
        return float(np.sqrt(res.fun)) if abs(w @ res.x - c) < 1e-9 else None
    eye = np.eye(d_dim)
    if norm == "linf":  # variables (d, t): min t, -t <= d_i <= t
        cost = np.r_[np.zeros(d_dim), 1.0]
        a_ub = np.block([[eye, -np.ones((d_dim, 1))], [-eye, -np.ones((d_dim, 1))]])
        a_eq, bounds = np.r_[w, 0.0][None], box + [(0, None)]
    else:  # variables (d, u): min sum u, -u <= d <= u
        cost = np.r_[np.zeros(d_dim), np.ones(d_dim)]
        a_ub = np.block([[eye, -eye], [-eye, -eye]])
        a_eq, bounds = np.r_[w, np.zeros(d_dim)][None], box + [(0, None)] * d_dim
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * d_dim), A_eq=a_eq, b_eq=[c], bounds=bounds)
    return float(res.fun) if res.status == 0 else None


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_onto_hyperplane_and_box_is_exact(norm):
    gen = torch.Generator().manual_seed(1)
    m, d = 12, 6
    p = torch.rand(m, d, generator=gen, dtype=torch.float64)
    w = torch.randn(m, d, generator=gen, dtype=torch.float64)
    w[0, :3] = 0  # coordinates the constraint ignores
    b = (w * torch.rand(m, d, generator=gen, dtype=torch.float64)).sum(1)  # meets the box
    b[1] = (w[1] * p[1]).sum()  # p already on the hyperplane: d = 0
    b[2] = w[2].clamp_min(0).sum() + 1.0  # beyond every box corner: infeasible
    step = project_hyperplane_box(p, w, b, norm)
    z = p + step
    assert z.min() >= -1e-12 and z.max() <= 1 + 1e-12
    assert step[1].abs().max() < 1e-12
    # infeasible: the box corner closest to the hyperplane (every coordinate moved toward it)
    torch.testing.assert_close(z[2], (w[2] > 0).to(z), rtol=0, atol=1e-12)
    for i in range(m):
        if i == 2:
            continue
        ref = _reference_projection(p[i].numpy(), w[i].numpy(), b[i].item(), norm)
        assert ref is not None
        assert abs((w[i] * z[i]).sum().item() - b[i].item()) < 1e-9, i  # on the hyperplane
        got = _size(z[i:i + 1], p[i:i + 1], norm).item()
        assert got == pytest.approx(ref, abs=1e-7), (i, got, ref)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fabt_norms_no_larger_than_deepfool(norm):
    """On every clean-correct example that both fool, FAB-T's perturbation is at most 2%
    larger than DeepFool's (whose 2% overshoot lands it past the boundary), and the median
    over those examples is strictly smaller. 30 iterations per target, not the default 100:
    on these 8x8 digits FAB-T has converged by then (the medians agree to 1e-3)."""
    model = natural_model()
    x, y = digits_batch(16, offset=16)
    correct = _predict(model, x) == y
    x_fab = FABT(model, norm, steps=30)(x, y)
    x_df = DeepFool(model, norm, steps=50)(x, y)
    both = correct & (_predict(model, x_fab) != y) & (_predict(model, x_df) != y)
    assert both.sum() >= 12
    fab, df = _size(x_fab, x, norm)[both], _size(x_df, x, norm)[both]
    assert (fab <= 1.02 * df + 1e-6).all(), (fab / df).max()
    assert fab.median() < df.median()


ATTACKS = {
    "fab": lambda m, norm: FAB(m, norm, steps=10),
    "fab-restarts": lambda m, norm: FAB(m, norm, steps=5, n_restarts=2, eps=0.5),
    "fab-t": lambda m, norm: FABT(m, norm, steps=5, n_target_classes=2, n_restarts=2, eps=0.5),
}


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_output_in_box_and_every_changed_example_fooled(name, norm):
    model = natural_model()
    x, y = digits_batch(12)
    x_adv = ATTACKS[name](model, norm)(x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    changed = (x_adv != x).flatten(1).any(1)
    assert changed.sum() >= 8  # the natural model is easy: most examples fall
    assert (_predict(model, x_adv)[changed] != y[changed]).all()


def test_targeted_fab_reaches_the_target():
    model = natural_model()
    x, y = digits_batch(12)
    target = (y + 2) % 5
    x_adv = FAB(model, "l2", steps=20)(x, y, target=target)
    changed = (x_adv != x).flatten(1).any(1)
    assert changed.sum() >= 10
    assert (_predict(model, x_adv)[changed] == target[changed]).all()


class _Unfoolable(nn.Module):
    """Class 0 wins everywhere in [0,1]: its logit exceeds the others by >= 1 (z_0 = 1 + s,
    z_j = s / 2 - j with s = mean(x) in [0, 1]), yet the gradients are not zero."""

    def forward(self, x):
        s = x.flatten(1).mean(1, keepdim=True)
        offsets = torch.arange(5, dtype=x.dtype)
        return torch.cat([1 + s, s / 2 - offsets[1:]], 1)


@pytest.mark.parametrize("attack", [FAB, FABT])
def test_unfooled_examples_come_back_unchanged(attack):
    x, _ = digits_batch(6)
    y = torch.zeros(6, dtype=torch.long)
    # random restarts move the iterate away from x; never fooled, x itself must come back
    x_adv = attack(_Unfoolable(), "l2", steps=5, n_restarts=2, eps=0.5)(x, y)
    assert torch.equal(x_adv, x)
    # already misclassified at x (a wrong label): unchanged, while the rest are attacked
    model = natural_model()
    x, y = digits_batch(8)
    wrong = torch.arange(8) % 2 == 0
    y = torch.where(wrong, (y + 1) % 5, y)
    x_adv = attack(model, "linf", steps=5)(x, y)
    assert torch.equal(x_adv[wrong], x[wrong])
    assert (x_adv[~wrong] != x[~wrong]).flatten(1).any(1).all()


def test_restarts_keep_the_smallest_perturbation():
    model = natural_model()
    x, y = digits_batch(8)
    one = _size(FAB(model, "l2", steps=10)(x, y), x, "l2")
    three = _size(FAB(model, "l2", steps=10, n_restarts=3, eps=1.0)(x, y), x, "l2")
    fooled = one > 0
    assert fooled.sum() >= 6
    assert (three[fooled] <= one[fooled] + 1e-6).all()
    assert (three[fooled] < one[fooled] - 1e-4).any()  # the random restarts did find better


@pytest.mark.parametrize("attack,norm", [(FAB, "l2"), (FABT, "linf"), (FABT, "l1")])
def test_batch_independence(attack, norm):
    """Examples 5..8 inside a batch of 16 get the same result as alone (random restarts on).

    In float64, where the model's forward is batch-invariant (float32 conv kernels are not on
    every CPU, and FAB's discrete choices amplify a 5e-7 logit change)."""
    model = fresh(natural_model()).double()
    x, y = digits_batch(16)
    x = x.double()
    kwargs = {"n_target_classes": 2} if attack is FABT else {}
    atk = attack(model, norm, steps=8, n_restarts=2, eps=0.5 if norm != "l1" else 3.0, **kwargs)
    together, alone = atk(x, y)[5:9], atk(x[5:9], y[5:9])
    assert not torch.equal(alone, x[5:9])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_unsupported_norm_and_bad_settings_raise_user_error():
    model = natural_model()
    with pytest.raises(UserError, match=r"'l0'.*linf, l2, l1"):
        FAB(model, "l0")
    with pytest.raises(UserError, match=r"'fab-t'.*'l3'.*linf, l2, l1"):
        FABT.build(model, 0.1, "l3")
    with pytest.raises(UserError, match="steps"):
        FAB(model, "l2", steps=0)
    with pytest.raises(UserError, match="n_target_classes"):
        FABT(model, "l2", n_target_classes=0)
    with pytest.raises(UserError, match="eps"):
        FAB(model, "l2", eps=-1.0)


def test_build_maps_the_evaluator_budget():
    model = natural_model()
    atk = FABT.build(model, 0.5, "l2", None, seed=3)
    assert isinstance(atk, FABT) and atk.norm == "l2" and atk.minimal_norm
    assert (atk.steps, atk.eps, atk.seed, atk.n_target_classes) == (100, 0.5, 3, 9)
    assert FAB.build(model, 0.0, "l1", 7).steps == 7
    assert FAB.build(model, 0.0, "l1", 7).eps == 5.0  # no eps: AutoAttack's restart radius


@pytest.mark.parametrize("attack", [FAB, FABT])
def test_modes_gradients_and_buffers_untouched_and_deterministic(attack):
    model = fresh(natural_model())
    model.train()
    model.blocks.block1[1].eval()  # a frozen BatchNorm must stay in eval mode afterwards
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {}
    for n, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        grads[n] = p.grad.clone()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    x, y = digits_batch(6)
    make = lambda: attack(model, "l2", steps=5, n_restarts=2, eps=0.5, seed=1)  # noqa: E731
    first = make()(x, y)
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    torch.testing.assert_close(make()(x, y), first, atol=1e-6, rtol=0)
    assert not torch.equal(first, x)


class _RowCounter(nn.Module):
    """Counts the rows every forward pass sees (the attack's work)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x):
        self.rows += len(x)
        return self.net(x)


@pytest.mark.parametrize("attack,norm,eps", [(FABT, "linf", 0.15), (FAB, "l2", 0.6)])
def test_stop_at_eps_breaks_the_same_examples_with_less_work(attack, norm, eps):
    """AutoAttack's rule (fab_pt.py): a later target / restart runs only on the examples not
    yet broken within eps. The examples broken within eps are exactly those a full search
    breaks within eps (a stopped example already has one; the others see the same runs), and
    the model sees fewer rows. Float64: batch-invariant forward passes."""
    x, y = digits_batch(24)
    x = x.double()
    sizes, rows = {}, {}
    for stop in (False, True):
        model = _RowCounter(fresh(natural_model()).double())
        atk = attack(model, norm, steps=10, n_restarts=2, eps=eps, stop_at_eps=stop)
        assert atk.stop_norm == (eps if stop else None)
        x_adv = atk(x, y)
        fooled = _predict(model, x_adv) != y
        sizes[stop] = torch.where(fooled, _size(x_adv, x, norm), torch.inf)
        rows[stop] = model.rows
    within = {stop: sizes[stop] <= eps for stop in sizes}
    assert 0 < within[True].sum() < len(y)
    assert torch.equal(within[True], within[False])
    assert (sizes[True] >= sizes[False] - 1e-12).all()  # the full search is never worse
    assert rows[True] < 0.8 * rows[False]
    assert FABT.build(natural_model(), 0.1, "linf").stop_norm == 0.1  # the evaluator's
