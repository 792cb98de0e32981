"""Attacks against textbook re-implementations and against each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attack_fixtures import digits_batch, natural_model, robust_model
from robust_transfer.attacks import (
    APGD,
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
from robust_transfer.data import load_task
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
        assert hit >= 0.9, (name, hit)
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
