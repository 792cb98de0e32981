"""Attack geometry: every attack in every norm it declares stays inside its threat model, an
undeclared norm is a clear error, APGD-L1 and Square-L2 do what their papers say, and an
example's result does not depend on the other examples in its batch."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from attack_fixtures import digits_batch, natural_model
from robust_transfer.attacks import (
    APGD,
    APGDT,
    BIM,
    FGSM,
    PGD,
    Square,
    UniversalPerturbation,
    make_threat,
)
from robust_transfer.attacks.apgd import APGDDLR, l1_topk_count
from robust_transfer.attacks.rng import ExampleRNG
from robust_transfer.attacks.square import p_selection
from robust_transfer.attacks.threats import project_l1_box
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import accuracy
from robust_transfer.train.examples import PGDExamples

EPS = {"linf": 0.1, "l2": 1.0, "l1": 2.0}
ALL_NORMS = ("linf", "l2", "l1")
# class -> (the norms it must declare, a small budget for `build`)
CLASSES = {
    FGSM: (("linf", "l2", "l1"), None),
    BIM: (("linf",), 3),
    PGD: (("linf", "l2", "l1"), 3),
    APGD: (("linf", "l2", "l1"), 5),
    APGDDLR: (("linf", "l2", "l1"), 5),
    APGDT: (("linf", "l2", "l1"), 3),
    Square: (("linf", "l2"), 30),
}
CASES = [(cls, norm) for cls, (norms, _) in CLASSES.items() for norm in norms]


def _inside(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> None:
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    dist = make_threat(norm, eps).distance(x_adv, x)
    assert (dist <= eps * (1 + 1e-5) + 1e-6).all(), (norm, dist.max().item(), eps)


@pytest.mark.parametrize(("cls", "norm"), CASES, ids=lambda v: getattr(v, "__name__", v))
def test_every_attack_stays_inside_every_declared_norm(cls, norm):
    norms, steps = CLASSES[cls]
    assert cls.norms == norms  # the declared norms are the ones implemented
    model = natural_model()
    x, y = digits_batch(12)
    atk = cls.build(model, EPS[norm], norm, steps=steps, seed=0)
    assert atk.norm == norm
    x_adv = atk(x, y)
    _inside(x_adv, x, norm, EPS[norm])
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_universal_perturbation_stays_in_its_ball(norm):
    model = natural_model()
    eps = {"l2": 1.0, "linf": 0.1}[norm]
    atk = UniversalPerturbation(model, eps, norm, max_passes=1, deepfool_steps=3)
    atk.fit(digits_batch(16, offset=100))
    _inside((0.5 + atk.v).clamp(0, 1), torch.full_like(atk.v, 0.5), norm, eps)
    assert make_threat(norm, eps).distance(atk.v, torch.zeros_like(atk.v)) > 0.5 * eps
    x, y = digits_batch(8)
    _inside(atk(x, y), x, norm, eps)


@pytest.mark.parametrize("cls", [*CLASSES, UniversalPerturbation],
                         ids=lambda c: c.__name__)
def test_undeclared_norm_names_the_supported_ones(cls):
    model = natural_model()
    for norm in sorted(set(ALL_NORMS) - set(cls.norms)) + ["l3"]:
        supported = ", ".join(cls.norms)
        with pytest.raises(UserError, match=f"norm '{norm}'.*supports: {supported}$"):
            cls(model, 1.0, norm=norm)
        if cls is not UniversalPerturbation:
            with pytest.raises(UserError, match=f"supports: {supported}$"):
                cls.build(model, 1.0, norm)


def test_bim_rejects_l2_instead_of_running_linf():
    with pytest.raises(UserError, match="'bim' does not support norm 'l2'; it supports: linf"):
        BIM.build(natural_model(), 0.5, "l2")
    with pytest.raises(UserError, match="supports: linf"):
        BIM(natural_model(), 0.5, steps=3, norm="l2")


def test_build_uses_the_published_budgets():
    model = natural_model()
    assert PGD.build(model, 0.1, "l2").steps == 20 and PGD.default_steps == 20
    assert APGD.build(model, 0.1, "l1").steps == 100 and APGD.build(model, 0.1, "l1").loss == "ce"
    dlr = APGDDLR.build(model, 0.1, "linf", steps=7)
    assert dlr.loss == "dlr" and dlr.steps == 7 and APGDDLR.name == "apgd-dlr"
    apgdt = APGDT.build(model, 0.1, "linf")
    assert apgdt.inner.steps == 100 and apgdt.n_target_classes == 9
    square = Square.build(model, 0.1, "l2")
    assert square.n_queries == 5000 and square.black_box and Square.name == "square"
    assert BIM.build(model, 8 / 255, "linf").steps == 10  # min(8 + 4, 1.25 * 8)
    names = {c.name for c in CLASSES}
    assert names == {"fgsm", "bim", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square"}


@pytest.mark.parametrize("eps", [math.inf, -math.inf, math.nan, -0.1])
def test_non_finite_or_negative_eps_is_a_user_error(eps):
    model = natural_model()
    with pytest.raises(UserError, match=f"eps must be >= 0 and finite, got {eps}"):
        make_threat("linf", eps)
    for make in (lambda: PGD(model, eps), lambda: APGD(model, eps, "l1"),
                 lambda: Square(model, eps, "l2"), lambda: BIM(model, eps),
                 lambda: FGSM(model, eps), lambda: UniversalPerturbation(model, eps)):
        with pytest.raises(UserError, match="eps must be >= 0 and finite"):
            make()


# ---- APGD-L1 (Croce & Hein 2021), literally, one example at a time ----
def textbook_apgd_l1(model, x, y, eps, n_iter, seed):
    """autopgd_base.py's L1 branch, per example: start x + P(t), t ~ N(0, I) (same streams
    as the attack: ExampleRNG, counter 0); step eta * e, e = sign(g) on the coordinates with
    |g| >= the floor((1 - topk) d)-th smallest |g| (the box-blocked ones zeroed first),
    ||e||_1 = 1; exact projection onto L1 ball and box; no momentum. Every max(floor(0.04 N),
    1) iterations: s = ||x_max - x||_0; topk = s / d / 1.5; if s < 0.95 s_old: eta = eps and
    jump to x_max, else eta = max(eta / 1.5, eps / 10). Returns the first fooling iterate,
    else x_max."""
    t = ExampleRNG.for_inputs(x, seed).normal(x.shape[1:], 0, dtype=x.dtype)
    d = x[0].numel()
    every = max(int(0.04 * n_iter), 1)
    out = []
    for i in range(len(x)):
        xi, yi = x[i:i + 1], y[i:i + 1]

        def proj(z, xi=xi):
            return (xi + project_l1_box(z - xi, -xi, 1 - xi, eps)).clamp(0, 1)

        def f(xa, yi=yi):
            xa = xa.clone().requires_grad_(True)
            logits = model(xa)
            loss = F.cross_entropy(logits, yi)
            return loss.item(), torch.autograd.grad(loss, xa)[0], logits.argmax(1).item() != yi

        def step(xa, g, eta, topk):
            g = g.flatten().clone()
            xf = xa.flatten()
            g[((xf <= 0) & (g < 0)) | ((xf >= 1) & (g > 0))] = 0
            threshold = g.abs().sort().values[min(max(math.floor((1 - topk) * d), 0), d - 1)]
            e = torch.where((g.abs() >= threshold) & (g != 0), g.sign(), torch.zeros_like(g))
            return xa + eta * (e / max(e.abs().sum().item(), 1)).view_as(xa)

        x_k = (xi + project_l1_box(t[i:i + 1], -xi, 1 - xi, eps)).clamp(0, 1)
        loss, g, fooled = f(x_k)
        x_fool = x_k if fooled else None
        x_max, f_max, g_max = x_k, loss, g
        eta, topk, s_old = eps, 0.2, d
        for k in range(n_iter):
            x_k = proj(step(x_k, g, eta, topk))
            loss, g, fooled = f(x_k)
            if fooled and x_fool is None:
                x_fool = x_k
            if loss > f_max:
                x_max, f_max, g_max = x_k, loss, g
            if (k + 1) % every == 0:
                s = int((x_max != xi).sum())
                shrank = s / max(s_old, 1) < 0.95
                topk, s_old = s / d / 1.5, s
                eta = eps if shrank else max(eta / 1.5, eps / 10)
                if shrank:
                    x_k, g = x_max, g_max
        out.append(x_fool if x_fool is not None else x_max)
    return torch.cat(out)


@pytest.mark.parametrize("steps", [25, 50])  # checks every iteration / every 2 iterations
def test_apgd_l1_matches_the_papers_algorithm(steps):
    model = copy.deepcopy(natural_model()).double()
    x, y = digits_batch(8)
    x = x.double()
    got = APGD(model, 1.5, "l1", steps=steps, seed=5)(x, y)
    want = textbook_apgd_l1(model, x, y, 1.5, steps, seed=5)
    fooled = model(got).argmax(1) != y
    assert 0 < fooled.sum() < len(y)  # both branches (first fooling point, x_max) exercised
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_l1_topk_count_follows_the_reference_threshold():
    # the reference steps on |g| >= the floor((1 - topk) d)-th smallest: 13 of 64 at 20%
    counts = l1_topk_count(torch.tensor([0.2, 0.0, 1.0, 0.05]), 64)
    assert counts.tolist() == [13, 1, 64, 4]


def test_apgd_l1_at_least_as_strong_as_pgd_l1_at_equal_budget():
    model = natural_model()
    x, y = digits_batch(100)
    pgd = accuracy(model, PGD(model, 2.0, steps=20, norm="l1", seed=0)(x, y), y)
    apgd = accuracy(model, APGD(model, 2.0, "l1", steps=20, seed=0)(x, y), y)
    assert apgd <= pgd, (apgd, pgd)
    # a meaningful comparison: PGD-L1 breaks some examples but leaves some to break
    assert accuracy(model, x, y) > 0.9 and 0.1 < pgd < 0.8 and apgd > 0, (pgd, apgd)


# ---- Square-L2 (Andriushchenko et al. 2020, Alg. 3) ----
class _Recorder(torch.nn.Module):
    """Constant logits (class 0 wins by 1, never fooled), recording every query."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))
        self.queries = []

    def forward(self, x):
        self.queries.append(x.detach().clone())
        return self.bias.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_square_l2_queries_stay_on_the_eps_sphere_and_move():
    # Mid-grey images and a small eps: nothing is clipped, so every query must have
    # ||delta||_2 == eps exactly (mass is moved between windows, never added or lost).
    model = _Recorder()
    x, y = torch.full((3, 2, 10, 10), 0.5), torch.zeros(3, dtype=torch.long)
    x[1] += 0.01  # distinct images: distinct random streams
    Square(model, 0.4, "l2", n_queries=60, seed=0)(x, y)
    clean, *rest = model.queries  # the first query asks whether x is already fooled
    assert torch.equal(clean, x)
    queries = torch.stack(rest)  # (60, 3, 2, 10, 10)
    assert len(queries) == 60
    norms = (queries - x).flatten(2).norm(dim=2)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.4), atol=1e-5, rtol=0)
    init = queries[0] - x  # centre-heavy blocks: not a uniform +-c pattern
    assert init[0].abs().unique().numel() > 2
    moved = (queries[1:] - queries[0]).flatten(2).abs().amax(2) > 1e-6
    assert moved.float().mean() > 0.9


def test_square_l2_lowers_accuracy_within_the_l2_ball():
    model = natural_model()
    x, y = digits_batch(48)
    init_only = Square(model, 1.0, "l2", n_queries=1, seed=0)(x, y)
    x_adv = Square(model, 1.0, "l2", n_queries=100, seed=0)(x, y)
    _inside(x_adv, x, "l2", 1.0)
    clean, start, after = accuracy(model, x, y), accuracy(model, init_only, y), \
        accuracy(model, x_adv, y)
    assert after <= clean - 0.3 and after < start, (clean, start, after)


# ---- batch independence: 4 examples inside a batch of 16 == the same 4 alone ----
BATCH_CASES = {
    "pgd-restarts": lambda m, s: PGD(m, 0.1, steps=5, seed=s, restarts=2),
    "pgd-l1-restarts": lambda m, s: PGD(m, 2.0, steps=5, norm="l1", seed=s, restarts=2),
    "apgd-linf": lambda m, s: APGD(m, 0.1, "linf", steps=10, seed=s),
    "apgd-l2": lambda m, s: APGD(m, 1.0, "l2", steps=10, seed=s),
    "apgd-l1": lambda m, s: APGD(m, 2.0, "l1", steps=10, seed=s, restarts=2),
    "apgd-t": lambda m, s: APGDT(m, 0.1, steps=5, n_target_classes=2, seed=s),
    "square-linf": lambda m, s: Square(m, 0.1, "linf", n_queries=60, seed=s),
    "square-l2": lambda m, s: Square(m, 1.0, "l2", n_queries=60, seed=s),
    "square-linf-batch-windows": lambda m, s: Square(m, 0.1, n_queries=60, seed=s,
                                                     windows="batch"),
    "square-l2-batch-windows": lambda m, s: Square(m, 1.0, "l2", n_queries=60, seed=s,
                                                   windows="batch"),
}


@pytest.mark.parametrize("name", list(BATCH_CASES))
def test_result_does_not_depend_on_the_batch(name):
    model = natural_model()
    x, y = digits_batch(16)
    batch = BATCH_CASES[name](model, 0)(x, y)
    alone = BATCH_CASES[name](model, 0)(x[4:8], y[4:8])
    torch.testing.assert_close(alone, batch[4:8], atol=1e-5, rtol=0)
    assert not torch.equal(batch, x)
    # and it is random: another seed gives other examples
    assert not torch.equal(BATCH_CASES[name](model, 1)(x[4:8], y[4:8]), alone)


def test_pgd_training_examples_get_fresh_starts_every_batch():
    model = natural_model()
    x, y = digits_batch(8)
    maker = PGDExamples(0.3, "linf", steps=1, alpha=0.0)  # alpha 0: the output is the start
    first, second = maker(model, x, y), maker(model, x, y)
    assert not torch.equal(first, second)
    again = PGDExamples(0.3, "linf", steps=1, alpha=0.0)  # same seed: same sequence
    torch.testing.assert_close(again(model, x, y), first, atol=0, rtol=0)
    torch.testing.assert_close(again(model, x, y), second, atol=0, rtol=0)


def test_square_batch_windows_share_one_window_and_one_sign_per_query():
    # AutoAttack's square.py: per query, one window and one sign per channel for the batch.
    # The margin never improves, so every proposal is the initial stripes with that window
    # set to x + sign * eps (nothing is clipped on mid-grey images).
    model = _Recorder()
    x = 0.3 + 0.4 * torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(6, dtype=torch.long)
    atk = Square(model, 0.1, n_queries=40, seed=0, windows="batch")
    atk(x, y)
    clean, init, *proposals = model.queries
    assert torch.equal(clean, x) and len(proposals) == 39
    for it, q in enumerate(proposals):
        moved = ((q - init).abs() > 1e-6).any(1).any(0)  # (8, 8): pixels any example moved
        rows, cols = moved.any(1).nonzero(), moved.any(0).nonzero()
        side = atk._side_linf(p_selection(atk.p_init, it, atk.n_queries), 8, 8)
        if len(rows):
            assert rows.max() - rows.min() < side and cols.max() - cols.min() < side
        sign = torch.sign(q - x)[:, :, moved]  # (6, 3, pixels)
        assert (sign == sign[:1, :, :1]).all()  # one sign per channel, for every example
    per_example = Square(model, 0.1, n_queries=40, seed=0)
    assert Square.build(model, 0.1, "linf").windows == "batch"
    assert per_example.windows == "example"
    with pytest.raises(UserError, match="square windows"):
        Square(model, 0.1, windows="pixel")
