"""Attacks against textbook re-implementations and against each other."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attack_fixtures import digits_batch, natural_model, robust_model
from robust_transfer.attacks import (
    APGD,
    APGDT,
    BIM,
    CW,
    FGSM,
    LBFGS,
    PGD,
    DeepFool,
    FoolingImages,
    Square,
    UniversalPerturbation,
)
from robust_transfer.attacks.apgd import checkpoints
from robust_transfer.attacks.rng import ExampleRNG
from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import accuracy


# ---- textbook updates, written out here (not imported from the package) ----
def _grad(model, x, y):
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, x)[0]


def textbook_fgsm(model, x, y, eps):
    return (x + eps * _grad(model, x, y).sign()).clamp(0, 1)


def textbook_bim_linf(model, x, y, eps, alpha, steps):
    xa = x.clone()
    for _ in range(steps):
        xa = xa + alpha * _grad(model, xa, y).sign()
        xa = torch.min(torch.max(xa, x - eps), x + eps).clamp(0, 1)
    return xa


def textbook_pgd_l2(model, x, y, eps, alpha, steps):
    xa = x.clone()
    for _ in range(steps):
        g = _grad(model, xa, y)
        g = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12)
        delta = xa + alpha * g - x
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)
        xa = (x + delta).clamp(0, 1)
    return xa


def test_fgsm_bim_pgd_match_textbook_updates():
    model = natural_model()
    x, y = digits_batch(32)
    torch.testing.assert_close(FGSM(model, 0.1)(x, y), textbook_fgsm(model, x, y, 0.1),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(BIM(model, 0.1, alpha=0.02, steps=7)(x, y),
                               textbook_bim_linf(model, x, y, 0.1, 0.02, 7), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        PGD(model, 0.1, alpha=0.03, steps=6, random_start=False)(x, y),
        textbook_bim_linf(model, x, y, 0.1, 0.03, 6), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        PGD(model, 1.0, alpha=0.3, steps=6, norm="l2", random_start=False)(x, y),
        textbook_pgd_l2(model, x, y, 1.0, 0.3, 6), atol=1e-5, rtol=0)


def test_bim_published_defaults():
    atk = BIM(natural_model(), 8 / 255)
    assert atk.alpha == pytest.approx(1 / 255) and atk.steps == 10  # min(8+4, 1.25*8)


def test_apgd_checkpoints_follow_the_paper():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_restarts_and_return_best_never_hurt():
    model = robust_model()
    x, y = digits_batch(64)
    one = accuracy(model, PGD(model, 0.15, steps=5, seed=0)(x, y), y)
    more = accuracy(model, PGD(model, 0.15, steps=5, seed=0, restarts=3)(x, y), y)
    best = accuracy(model, PGD(model, 0.15, steps=5, seed=0, return_best=True)(x, y), y)
    assert more <= one and best <= one


def test_apgd_at_least_as_strong_as_pgd_on_robust_model():
    model = robust_model()
    x, y = digits_batch(100)
    for eps in (0.15, 0.2):
        pgd = accuracy(model, PGD(model, eps, steps=20, seed=0)(x, y), y)
        apgd = accuracy(model, APGD(model, eps, steps=20, seed=0)(x, y), y)
        assert apgd <= pgd, (eps, apgd, pgd)
    assert accuracy(model, x, y) > 0.9 and pgd < 0.9  # the comparison is not vacuous


def test_cw_median_l2_not_larger_than_deepfool():
    model = natural_model()
    x, y = digits_batch(24)
    df = DeepFool(model)(x, y)
    cw = CW(model, c=0.1, steps=300, search_steps=5)(x, y)
    wrong_df = model(df).argmax(1) != y
    wrong_cw = model(cw).argmax(1) != y
    both = wrong_df & wrong_cw
    assert both.float().mean() > 0.8
    l2_df = (df - x)[both].flatten(1).norm(dim=1).median()
    l2_cw = (cw - x)[both].flatten(1).norm(dim=1).median()
    assert l2_cw <= l2_df, (l2_cw, l2_df)


def test_lbfgs_finds_small_misclassifying_perturbations():
    model = natural_model()
    x, y = digits_batch(16)
    xa = LBFGS(model, search_steps=4, max_iter=30)(x, y)
    assert (model(xa).argmax(1) != y).float().mean() > 0.9
    df = DeepFool(model)(x, y)
    # the c search should land in the same ballpark as DeepFool's minimal perturbation
    assert (xa - x).flatten(1).norm(dim=1).median() < 2 * (df - x).flatten(1).norm(dim=1).median()


def test_targeted_attacks_reach_the_target():
    model = natural_model()
    x, y = digits_batch(40)
    target = (y + 1) % 5
    attacks = {
        "pgd-l2": PGD(model, 2.0, steps=20, norm="l2", seed=0),
        "pgd-linf": PGD(model, 0.3, steps=20, seed=0),
        "apgd-dlr": APGD(model, 0.3, steps=20, loss="dlr", seed=0),
        "apgd-ce-l2": APGD(model, 2.0, "l2", steps=20, seed=0),
        "cw": CW(model, c=1.0, steps=200, lr=0.05, search_steps=3),
        "lbfgs": LBFGS(model, search_steps=3, max_iter=30),
        "square": Square(model, 0.3, n_queries=1000, seed=0),
    }
    for name, atk in attacks.items():
        hit = (model(atk(x, y, target=target)).argmax(1) == target).float().mean().item()
        assert hit >= 0.9 - 1e-6, (name, hit)
    # one FGSM step at least raises the target probability for most examples
    p0 = model(x).softmax(1).gather(1, target[:, None])
    p1 = model(FGSM(model, 0.1)(x, y, target=target)).softmax(1).gather(1, target[:, None])
    assert (p1 > p0).float().mean() > 0.9


def test_square_black_box_lowers_accuracy_without_gradients():
    model = natural_model()
    x, y = digits_batch(40)
    with torch.no_grad():  # would break any attack that needs gradients... Square does not
        xa = Square(model, 0.3, n_queries=200, seed=0)(x, y)
    assert accuracy(model, xa, y) < accuracy(model, x, y) - 0.3


def test_universal_perturbation_fools_held_out_data():
    model = natural_model()
    task = load_task("digits-0to4")
    atk = UniversalPerturbation(model, eps=2.5, max_passes=3, deepfool_steps=10, seed=0)
    atk.fit(task.train.subset(torch.arange(300)))
    rate = atk.fooling_rate(task.test)
    assert atk.v.norm() <= 2.5 + 1e-5
    assert rate > 0.3, rate
    # the same norm of random noise fools far fewer
    noise = torch.randn(atk.v.shape, generator=torch.Generator().manual_seed(0))
    noisy = (task.test.x + 2.5 * noise / noise.norm()).clamp(0, 1)
    clean_pred = model(task.test.x).argmax(1)
    assert (model(noisy).argmax(1) != clean_pred).float().mean() < rate


@pytest.mark.parametrize("start", ["noise", "blank"])
def test_fooling_images_reach_99_percent(start):
    model = natural_model()
    images, conf = FoolingImages(model, steps=300, seed=0).generate(5, (1, 8, 8), start)
    assert images.shape == (5, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert (conf >= 0.99).all(), conf


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_fgsm_and_pgd_raise_the_loss_over_clean_inputs(norm, eps):
    model = natural_model()
    x, y = digits_batch(64)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
    for atk in (FGSM(model, eps, norm), PGD(model, eps, steps=5, norm=norm, seed=0)):
        with torch.no_grad():
            adv = F.cross_entropy(model(atk(x, y)), y, reduction="none")
        assert adv.mean() > 2 * clean.mean()
        assert (adv > clean).float().mean() >= 0.9


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_gives_the_clean_inputs_and_clean_accuracy(norm):
    model = natural_model()
    x, y = digits_batch(64)
    for atk in (FGSM(model, 0.0, norm), PGD(model, 0.0, steps=3, norm=norm, seed=0)):
        x_adv = atk(x, y)
        assert torch.equal(x_adv, x)
        assert accuracy(model, x_adv, y) == accuracy(model, x, y)


# ---- APGD, literally: Algorithm 1 of Croce & Hein 2020, one example at a time ----
def textbook_apgd(model, x, y, eps, n_iter, norm, seed):
    """Per example: z = P(x_k + eta * s(grad)); x_{k+1} = P(x_k + a (z - x_k) + (1-a)(x_k -
    x_{k-1})), a = 1 on the first step and 0.75 after; at each checkpoint halve eta and jump
    to x_max (keeping x_{k-1}: the paper's momentum term after the jump is x_max - x_k) when
    (1) fewer than 75% of the steps since the last checkpoint raised the loss or (2) eta was
    not halved at the last checkpoint (as in autopgd_base.py, not at the first one) and
    f_max did not improve since it. Start on the sphere: Linf x + eps t/|t|_inf with t ~
    U[-1,1]^d; L2 x + eps g/|g|_2 with g ~ N(0, I) (autopgd_base.py). Returns x where the
    model is already wrong there (autopgd_base.py attacks only the others), else the first
    fooling iterate, else x_max."""
    rng = ExampleRNG.for_inputs(x, seed)  # per-example streams; counter 0 = first restart
    if norm == "linf":
        t = 2 * rng.uniform(x.shape[1:], 0, dtype=x.dtype) - 1
        t = t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    else:
        t = rng.normal(x.shape[1:], 0, dtype=x.dtype)
        t = t / t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    marks = checkpoints(n_iter)
    out = []
    for i in range(len(x)):
        xi, yi = x[i:i + 1], y[i:i + 1]
        if model(xi).argmax(1).item() != yi.item():
            out.append(xi)
            continue

        def proj(z, xi=xi):
            d = z - xi
            if norm == "linf":
                d = d.clamp(-eps, eps)
            else:
                d = d * min(1.0, eps / max(d.norm().item(), 1e-12))
            return (xi + d).clamp(0, 1)

        def f(xa, yi=yi):
            xa = xa.clone().requires_grad_(True)
            logits = model(xa)
            loss = F.cross_entropy(logits, yi)
            return loss.item(), torch.autograd.grad(loss, xa)[0], logits.argmax(1).item() != yi

        def s(g):
            return g.sign() if norm == "linf" else g / (g.norm() + 1e-12)

        x_k = proj((xi + eps * t[i:i + 1]).clamp(0, 1))
        loss, g, fooled = f(x_k)
        x_fool = x_k if fooled else None
        x_max, f_max, g_max = x_k, loss, g
        x_prev, eta, losses = x_k, 2 * eps, [loss]
        last, f_max_last, halved_last = 0, f_max, True
        for k in range(n_iter):
            a = 1.0 if k == 0 else 0.75
            z = proj(x_k + eta * s(g))
            x_prev, x_k = x_k, proj(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev))
            loss, g, fooled = f(x_k)
            losses.append(loss)
            if fooled and x_fool is None:
                x_fool = x_k
            if loss > f_max:
                x_max, f_max, g_max = x_k, loss, g
            if k + 1 in marks:
                ups = sum(losses[j + 1] > losses[j] for j in range(last, k + 1))
                halve = ups < 0.75 * (k + 1 - last) or (not halved_last and f_max <= f_max_last)
                if halve:
                    eta, x_k, g = eta / 2, x_max, g_max
                last, f_max_last, halved_last = k + 1, f_max, halve
        out.append(x_fool if x_fool is not None else x_max)
    return torch.cat(out)


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.4)])
def test_apgd_matches_the_papers_algorithm(norm, eps):
    model = copy.deepcopy(natural_model()).double()
    x, y = digits_batch(16)
    x = x.double()
    got = APGD(model, eps, norm, steps=30, seed=3)(x, y)
    want = textbook_apgd(model, x, y, eps, 30, norm, seed=3)
    fooled = model(got).argmax(1) != y
    assert 0 < fooled.sum() < len(y)  # both branches (first fooling point, x_max) exercised
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_apgd_t_counts_any_misclassification_not_only_the_target():
    # One input coordinate d = x0 - 0.5 moves the logits: z = (1, 0.9 + 0.5d, -2 + 40d, 0.8,
    # 0.7). Class 1 (the first target) can never win within eps = 0.1, but the ascent on
    # its targeted DLR loss pushes d to 0.1, where class 2 wins: the example is not robust.
    lin = nn.Linear(2, 5)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0, 0], [0.5, 0], [40, 0], [0, 0], [0, 0]]))
        lin.bias.copy_(torch.tensor([1.0, 0.65, -22.0, 0.8, 0.7]))
    model = nn.Sequential(nn.Flatten(), lin)
    x, y = torch.full((4, 1, 1, 2), 0.5), torch.zeros(4, dtype=torch.long)
    x_adv = APGDT(model, 0.1, steps=10, n_target_classes=1, seed=0)(x, y)
    assert (model(x_adv).argmax(1) == 2).all()
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


class _Recorder(nn.Module):
    """Constant logits (class 0 always wins by 1), recording every query."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))
        self.queries = []

    def forward(self, x):
        self.queries.append(x.detach().clone())
        return self.bias.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_square_never_spends_a_query_on_an_unchanged_point():
    # The margin never improves, so x_best stays the initial stripes; a proposal with the
    # signs x_best already has there would be the same point again (the reference redraws).
    model = _Recorder()
    x, y = torch.full((6, 1, 8, 8), 0.5), torch.zeros(6, dtype=torch.long)
    Square(model, 0.1, n_queries=150, seed=0)(x, y)
    clean, init, *rest = model.queries  # whether x is already fooled; then the stripes
    assert torch.equal(clean, x)
    proposals = torch.stack(rest)
    assert len(proposals) == 149
    unchanged = (proposals - init).abs().flatten(2).amax(2) < 1e-7
    assert not unchanged.any(), unchanged.sum()


def test_universal_linf_adds_l2_deepfool_steps_as_the_paper():
    # Algorithm 1 adds arg min ||r||_2 (DeepFool L2) for every p, then projects onto the
    # p-ball. On a linear model that step is parallel to the weight difference w, where an
    # Linf DeepFool step would be parallel to sign(w).
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [0.3, -1.0, 0.1, 0.6]]))
        lin.bias.copy_(torch.tensor([0.5, 0.0]))
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.full((1, 1, 2, 2), 0.5)
    atk = UniversalPerturbation(model, eps=1.0, norm="linf", max_passes=1, batch_size=1)
    v = atk.fit(x).v.flatten()
    w = lin.weight[1] - lin.weight[0]
    assert F.cosine_similarity(v, w.detach(), dim=0) > 0.999
    assert atk.fooling_rate(x) == 1.0


def test_dlr_on_too_few_classes_is_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.full((2, 1, 2, 2), 0.5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(UserError, match="DLR loss needs at least 3 classes, got 2"):
        APGD(model, 0.1, steps=2, loss="dlr")(x, y)


class _Rows(nn.Module):
    """Counts the rows of every forward pass and the backward passes through it."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows, self.backwards = net, [], 0

    def forward(self, x):
        self.rows.append(len(x))
        if x.requires_grad:
            x.register_hook(self._count)
        return self.net(x)

    def _count(self, grad):
        self.backwards += 1


def test_apgd_drops_fooled_examples_and_skips_the_last_backward():
    """A fooled example's result is its first fooling iterate, so APGD stops attacking it
    (the results match the per-example textbook run above); the last iterate needs a loss,
    not a gradient."""
    model = _Rows(copy.deepcopy(natural_model()).double())
    x, y = digits_batch(16)
    got = APGD(model, 0.03, "linf", steps=30, seed=3)(x.double(), y)
    want = textbook_apgd(model.net, x.double(), y, 0.03, 30, "linf", seed=3)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    fooled = int((model.net(got).argmax(1) != y).sum())
    assert 0 < fooled < len(y)
    assert model.rows[0] == len(y) and model.rows[-1] < len(y)  # the fooled ones left
    assert model.rows == sorted(model.rows, reverse=True)
    # the clean check, the start and 30 iterates: 32 forwards; 30 backwards
    assert len(model.rows) == 32 and model.backwards == 30


def _propose_linf_loop(atk, x, x_best, rng, it, p):
    """Square's Linf proposal with the reference code's redraw loop written out: per
    example, try the pre-drawn signs in order until the window changes x_best (at most
    _RESAMPLE redraws). Also returns how many examples needed a redraw."""
    from robust_transfer.attacks.square import _PLACES, _RESAMPLE

    m, c, h, w = x.shape
    s = min(max(round((p * h * w) ** 0.5), 1), min(h, w) - 1)
    u = rng.uniform((2 + (_RESAMPLE + 1) * c,), it, _PLACES, dtype=torch.float64)
    top = (u[:, 0] * max(h - s, 1)).floor().long()
    left = (u[:, 1] * max(w - s, 1)).floor().long()
    out, redrawn = x_best.clone(), 0
    for i in range(m):
        for t in range(_RESAMPLE + 1):
            redrawn += t == 1
            signs = torch.where(u[i, 2 + t * c:2 + (t + 1) * c] < 0.5, -1.0, 1.0).to(x.dtype)
            cand = x_best[i].clone()
            rows, cols = slice(top[i], top[i] + s), slice(left[i], left[i] + s)
            cand[:, rows, cols] = x[i, :, rows, cols] + atk.eps * signs.view(c, 1, 1)
            cand = atk.threat.project(cand[None], x[i:i + 1])[0]
            out[i] = cand
            if (cand - x_best[i]).abs().max() >= 1e-7:
                break
    return out, redrawn


@pytest.mark.parametrize("channels,p", [(1, 0.02), (3, 0.02), (1, 0.05)])
def test_square_redraws_in_one_pass_as_the_loop(channels, p):
    """The vectorised redraw picks, per example, the same try as the loop: examples need
    redraws where the window is one pixel (p small) or its pixels are saturated."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(80, channels, 8, 8, generator=gen)
    x[:10] = x[:10].round()  # saturated: +eps or -eps often lands where x_best already is
    atk = Square(nn.Identity(), 0.3)
    rng = ExampleRNG.for_inputs(x, 0)
    x_best = atk.threat.project(x + 0.3 * rng.sign((channels, 1, 8), -1), x)
    from robust_transfer.attacks.square import _PLACES

    u = rng.uniform((atk._n_draws(channels),), 7, _PLACES, dtype=torch.float64)
    got = atk._propose_linf(x, x_best, u, p)
    want, redrawn = _propose_linf_loop(atk, x, x_best, rng, 7, p)
    assert torch.equal(got, want)
    assert redrawn >= 3
    unchanged = (got - x_best).flatten(1).abs().amax(1) < 1e-7
    assert unchanged.float().mean() < 0.2
