"""Evaluation cascade, gradient-masking warnings, transfer matrix, attack figures."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from attack_fixtures import digits_batch, natural_model, robust_model
from robust_transfer.attacks import (
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
    table = evaluate(model, (x, y), ["fgsm", "bim", "deepfool"], eps, "linf", steps=10)
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
    table = evaluate(model, (x, y), ["deepfool"], [0.0, 100.0], "l2")
    acc = table[table["attack"] == "worst case"]["robust_accuracy"].tolist()
    assert acc[0] == pytest.approx(accuracy(model, x, y))  # eps=0: nothing counts
    assert acc[1] < 0.1


def test_evaluate_returns_examples_and_rejects_bad_input():
    model = natural_model()
    x, y = digits_batch(10)
    examples = {}
    evaluate(model, (x, y), ["pgd"], [0.1], steps=3, examples=examples)
    assert examples[0.1].shape == x.shape
    assert ((examples[0.1] - x).abs().amax() <= 0.1 + 1e-6)
    with pytest.raises(UserError, match="unknown attack 'nope'"):
        evaluate(model, (x, y), ["nope"], [0.1])
    with pytest.raises(UserError, match="eps"):
        evaluate(model, (x, y), ["pgd"], [-0.1])


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
    msgs = _fired(evaluate, model, (x, y), ["fgsm", "square"], [0.3], "linf", steps=200)
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
    table = transfer_matrix(models, (x, y), "pgd", 0.2, "linf", steps=5)
    mat = as_matrix(table)
    assert list(mat.index) == ["natural", "robust"] == list(mat.columns)
    # white-box diagonal: the natural model is most hurt by its own examples
    assert mat.loc["natural", "natural"] <= mat.loc["natural", "robust"]
    direct = accuracy(models["robust"], PGD(models["natural"], 0.2, steps=5, seed=0)(x, y), y)
    assert mat.loc["natural", "robust"] == pytest.approx(direct)

    curves = robust_accuracy_curves(
        evaluate(models["robust"], (x, y), ["fgsm", "pgd"], [0.05, 0.1, 0.2], steps=3),
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
