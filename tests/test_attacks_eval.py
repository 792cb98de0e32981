"""Evaluation cascade, gradient-masking warnings, transfer matrix, attack figures."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from attack_fixtures import digits_batch, natural_model, robust_model
from robust_transfer.attacks import (
    FABT,
    PGD,
    GradientMaskingWarning,
    as_matrix,
    check_model,
    evaluate,
    make_attack,
    transfer_matrix,
)
from robust_transfer.attacks.masking import check_black_box, check_eps_curve
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import accuracy
from robust_transfer.report.attack_figures import (
    adversarial_gallery,
    robust_accuracy_curves,
    transfer_heatmap,
)


class Quantised(nn.Module):
    """A known-weak defense: input quantisation (zero gradient almost everywhere)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


class SoftmaxOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(1)


class Noisy(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x + 0.05 * torch.randn_like(x))


def _fired(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, GradientMaskingWarning)]


def test_cascade_is_worst_case_per_example():
    model = robust_model()
    x, y = digits_batch(60)
    eps = [0.1, 0.2]
    # deterministic attacks, so "alone" and "in the cascade" see the same examples
    table = evaluate(model, x, y, ["fgsm", "bim", "deepfool"], eps, "linf", steps=10)
    assert set(table["attack"]) == {"fgsm", "bim", "deepfool", "worst case"}
    for e in eps:
        part = table[table["eps"] == e].set_index("attack")
        worst = part.loc["worst case", "robust_accuracy"]
        # worst case <= every single attack alone, and the cascade is non-increasing
        for name in ("fgsm", "bim"):
            alone = accuracy(model, make_attack(name, model, e, "linf", steps=10)(x, y), y)
            assert worst <= alone + 1e-9
        stages = part.loc[["fgsm", "bim", "deepfool"], "robust_accuracy"].tolist()
        assert stages == sorted(stages, reverse=True)
        assert part.loc["worst case", "clean_accuracy"] == pytest.approx(accuracy(model, x, y))
        assert part.loc["deepfool", "median_min_norm"] > 0
    w = table[table["attack"] == "worst case"]["robust_accuracy"].tolist()
    assert w[1] <= w[0]


def test_minimal_norm_attack_counts_only_within_eps():
    model = natural_model()
    x, y = digits_batch(30)
    table = evaluate(model, x, y, ["deepfool"], [0.0, 100.0], "l2")
    acc = table[table["attack"] == "worst case"]["robust_accuracy"].tolist()
    assert acc[0] == pytest.approx(accuracy(model, x, y))  # eps=0: nothing counts
    assert acc[1] < 0.1


def test_evaluate_returns_examples_and_rejects_bad_input():
    model = natural_model()
    x, y = digits_batch(10)
    examples = {}
    evaluate(model, x, y, ["pgd"], [0.1], steps=3, examples=examples)
    assert examples[0.1].shape == x.shape
    assert ((examples[0.1] - x).abs().amax() <= 0.1 + 1e-6)
    with pytest.raises(UserError, match="unknown attack 'nope'"):
        evaluate(model, x, y, ["nope"], [0.1])
    with pytest.raises(UserError, match="eps"):
        evaluate(model, x, y, ["pgd"], [-0.1])


def test_masking_warnings_fire_on_weak_defenses():
    net = natural_model()
    x, y = digits_batch(32)
    assert any("zero input gradients" in m for m in _fired(check_model, Quantised(net), x, y))
    assert any("probabilities" in m for m in _fired(check_model, SoftmaxOut(net), x, y))
    assert any("not deterministic" in m for m in _fired(check_model, Noisy(net), x, y))
    nan_net = nn.Sequential(net, nn.Identity())
    x_nan = x.clone()
    x_nan[0, 0, 0, 0] = float("nan")
    assert any("NaN" in m for m in _fired(check_model, nan_net, x_nan, y))
    # a plain logits model passes all checks
    assert _fired(check_model, net, x, y) == []


def test_black_box_beating_white_box_warns_on_quantised_model():
    model = Quantised(natural_model())
    x, y = digits_batch(40)
    msgs = _fired(evaluate, model, x, y, ["fgsm", "square"], [0.3], "linf", steps=200)
    assert any("zero input gradients" in m for m in msgs)
    assert any("black-box attack 'square'" in m for m in msgs)


def test_eps_curve_and_black_box_checks():
    assert any("rises with eps" in m for m in _fired(check_eps_curve, [0.1, 0.2], [0.5, 0.7]))
    assert _fired(check_eps_curve, [0.1, 0.2], [0.7, 0.5]) == []
    stages = [("apgd-ce", False, 0.5), ("square", True, 0.4)]
    assert _fired(check_black_box, stages)
    assert _fired(check_black_box, [("apgd-ce", False, 0.5), ("square", True, 0.5)]) == []


def test_transfer_matrix_and_figures(tmp_path):
    models = {"natural": natural_model(), "robust": robust_model()}
    x, y = digits_batch(40)
    table = transfer_matrix(models, x, y, "pgd", 0.2, "linf", steps=5)
    mat = as_matrix(table)
    assert list(mat.index) == ["natural", "robust"] == list(mat.columns)
    # white-box diagonal: the natural model is most hurt by its own examples
    assert mat.loc["natural", "natural"] <= mat.loc["natural", "robust"]
    # independent: PGD on the examples the natural model gets right, clean elsewhere
    crafted = PGD(models["natural"], 0.2, steps=5, seed=0)(x, y)
    right = models["natural"](x).argmax(1) == y
    crafted = torch.where(right.view(-1, 1, 1, 1), crafted, x)
    direct = accuracy(models["robust"], crafted, y)
    assert mat.loc["natural", "robust"] == pytest.approx(direct)

    curves = robust_accuracy_curves(
        evaluate(models["robust"], x, y, ["fgsm", "pgd"], [0.05, 0.1, 0.2], steps=3),
        tmp_path / "curves.png")
    model = models["natural"]
    gallery = adversarial_gallery(model, x[:3], PGD(model, 0.2, steps=5)(x[:3], y[:3]),
                                  tmp_path / "gallery.png")
    heat = transfer_heatmap(table, tmp_path / "heat.png")
    for path in (curves, gallery, heat):
        assert path.is_file() and path.stat().st_size > 1000
        assert path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "gallery.png",
                                                           "heat.png"]


def test_bim_refuses_l2_instead_of_running_linf():
    """Was: evaluate(..., ["bim"], norm="l2") ran an L-infinity BIM (L2 norms of 2-3 at 0.5)."""
    model = natural_model()
    x, y = digits_batch(8)
    with pytest.raises(UserError, match="'bim' does not support norm 'l2'.*linf"):
        evaluate(model, x, y, ["bim"], [0.5], "l2")
    with pytest.raises(UserError, match="does not support norm 'linf'"):
        evaluate(model, x, y, ["pgd", "cw"], [0.1], "linf")


def test_minimal_norm_examples_in_the_transfer_matrix_respect_eps():
    """Was: deepfool/cw/lbfgs rows were labelled eps=0.01 with Linf perturbations of ~0.1."""
    models = {"natural": natural_model(), "robust": robust_model()}
    x, y = digits_batch(40)
    tiny = transfer_matrix(models, x, y, "deepfool", [0.01, 10.0], "linf")
    at = {e: as_matrix(tiny[tiny.eps == e]) for e in (0.01, 10.0)}
    clean = accuracy(models["natural"], x, y)
    # at eps=0.01 nothing DeepFool finds fits in the ball: the diagonal stays clean accuracy
    assert at[0.01].loc["natural", "natural"] == pytest.approx(clean)
    assert at[10.0].loc["natural", "natural"] < clean - 0.5


def test_two_factories_get_their_own_rows_not_a_shared_cache():
    """Was: minimal-norm results were cached by name, so two lambdas shared one entry."""
    from robust_transfer.attacks import DeepFool

    model = natural_model()
    x, y = digits_batch(30)
    table = evaluate(model, x, y, [lambda m, e: DeepFool(m, "l2", steps=1, overshoot=0.0),
                                   lambda m, e: DeepFool(m, "l2", steps=50)], [100.0], "l2",
                     check=False)
    rows = table[table.attack != "worst case"].set_index("attack")
    assert list(rows.index) == ["<lambda>", "<lambda> (2)"]
    one_step, full = rows["median_min_norm"]
    assert one_step != pytest.approx(full)
    assert rows["n_broken"].sum() == table[table.attack == "worst case"]["n_broken"].item()


def test_autoattack_cascade_names_its_stages_and_counts_breaks():
    model = natural_model()
    x, y = digits_batch(24)
    table = evaluate(model, x, y, ["autoattack-fast"], [0.15], "linf", steps=3)
    stages = table[table.attack != "worst case"]
    assert list(stages.attack) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    worst = table[table.attack == "worst case"].iloc[0]
    assert stages["n_broken"].sum() == worst["n_broken"]
    assert worst["robust_accuracy"] == pytest.approx(stages["robust_accuracy"].iloc[-1])
    assert worst["robust_accuracy"] < worst["clean_accuracy"]


def test_evaluate_rejects_untyped_data():
    model = natural_model()
    x, y = digits_batch(4)
    with pytest.raises(UserError, match="shape"):
        evaluate(model, x[0], y, ["pgd"], [0.1])
    with pytest.raises(UserError, match="tensors"):
        evaluate(model, [x], y, ["pgd"], [0.1])


def test_attack_figures_show_what_they_claim():
    import matplotlib.pyplot as plt

    from robust_transfer.report.attack_figures import (
        gallery_figure,
        robust_accuracy_figure,
        transfer_figure,
    )

    models = {"natural": natural_model(), "robust": robust_model()}
    x, y = digits_batch(20)
    table = evaluate(models["robust"], x, y, ["fgsm", "pgd"], [0.05, 0.1, 0.2], steps=3,
                     check=False)
    fig = robust_accuracy_figure(table, title="robust")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["after fgsm", "after pgd", "worst case"]
    assert labels[3].startswith("clean (")
    assert ax.get_xlabel() == "eps (linf)" and ax.get_ylabel() == "robust accuracy"
    worst = [ln for ln in ax.get_lines() if ln.get_label() == "worst case"][0]
    expected = table[table.attack == "worst case"].sort_values("eps")
    assert list(worst.get_xdata()) == list(expected.eps)
    assert list(worst.get_ydata()) == pytest.approx(list(expected.robust_accuracy))
    plt.close(fig)

    matrix = transfer_matrix(models, x, y, "fgsm", [0.1, 0.2], "linf")
    fig = transfer_figure(matrix)
    heat_axes = [a for a in fig.axes if a.get_images()]
    assert len(heat_axes) == 2  # one panel per eps
    for ax, e in zip(heat_axes, (0.1, 0.2), strict=True):
        assert f"eps={e}" in ax.get_title()
        shown = ax.get_images()[0].get_array()
        expected = as_matrix(matrix[matrix.eps == e]).to_numpy().ravel().tolist()
        assert shown.ravel().tolist() == pytest.approx(expected)
        assert [t.get_text() for t in ax.get_yticklabels()] == ["natural", "robust"]
    plt.close(fig)

    model = models["natural"]
    x_adv = PGD(model, 0.2, steps=5, seed=0)(x[:3], y[:3])
    fig = gallery_figure(model, x[:3], x_adv, class_names=list("abcde"))
    titles = [a.get_title() for a in fig.axes]
    assert len(fig.axes) == 9
    assert sum(t.startswith("clean: ") for t in titles) == 3
    assert sum(t.startswith("adversarial: ") for t in titles) == 3
    assert sum("perturbation" in t for t in titles) == 3
    plt.close(fig)


def test_minimal_norm_stages_run_once_per_example_on_the_still_robust_only():
    """AutoAttack's rule for minimal-norm stages too: FAB-T attacks only the examples the
    earlier stages left robust, each at most once over all eps, except where it stopped at a
    larger eps than one asked later (then that eps gets its own run). Every eps gives what
    an evaluation at that eps alone gives, in any eps order (float64: batch-invariant)."""
    model = copy.deepcopy(robust_model()).double()
    x, y = digits_batch(40)
    x = x.double()
    seen = []

    def fab(m, e):
        atk = FABT.build(m, e, "linf", 8)
        inner = atk.perturb
        atk.perturb = lambda xs, ys, t: (seen.append(len(xs)), inner(xs, ys, t))[1]
        return atk

    eps = [0.2, 0.05, 0.1]
    table = evaluate(model, x, y, ["fgsm", fab], eps, "linf", check=False)
    for e in eps:
        alone = evaluate(model, x, y, ["fgsm", "fab-t"], [e], "linf", steps=8, check=False)
        got = table[table.eps == e].set_index("attack")["robust_accuracy"]
        assert got["worst case"] == alone.set_index("attack").loc["worst case",
                                                                   "robust_accuracy"]
    fgsm = table[table.attack == "fgsm"].set_index("eps")["robust_accuracy"] * len(y)
    assert seen[0] == round(fgsm[0.2])  # only the examples FGSM left
    assert sum(seen) < round(fgsm.sum())  # less than a run per eps
