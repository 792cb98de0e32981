"""Influence functions: gradients, HVPs, the three solvers, sign/scale vs leave-one-out."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explain_fixtures import checkpoints, study_results
from robust_transfer.errors import UserError
from robust_transfer.explain import (
    CGInfluence,
    ExactInfluence,
    LiSSAInfluence,
    class_match_fractions,
    load_finetune,
    make_influence,
    rank_training_images,
    validate_leave_one_out,
)
from robust_transfer.explain.loo import minimise
from robust_transfer.models import load_checkpoint
from robust_transfer.report.influence import class_match_table, influence_examples
from robust_transfer.studies.influence import InfluenceStudy


@pytest.fixture(scope="module")
def ft():
    return load_finetune(checkpoints().ft_robust)


def _params(model, blocks):
    block_params = [p for b in list(model.blocks)[len(model.blocks) - blocks:]
                    for p in b.parameters()]
    return block_params + list(model.head.parameters())


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


@pytest.mark.parametrize("blocks", [0, 1])
def test_per_example_gradients_match_a_loop(ft, blocks):
    model = copy.deepcopy(ft.model).double().eval()
    module = CGInfluence(model, ft.train, unfrozen_blocks=blocks)
    x, y = ft.task.test.x[:6], ft.task.test.y[:6]
    params = _params(model, blocks)
    assert module.num_params == sum(p.numel() for p in params)
    loop = torch.stack([
        _flat(torch.autograd.grad(F.cross_entropy(model(x[i : i + 1].double()), y[i : i + 1]),
                                  params))
        for i in range(len(x))
    ])
    torch.testing.assert_close(module.per_example_gradients(x, y), loop, rtol=1e-9, atol=1e-12)


def test_hvp_matches_double_backward_over_the_last_block(ft):
    model = copy.deepcopy(ft.model).double().eval()
    module = CGInfluence(model, ft.train, unfrozen_blocks=1, weight_decay=5e-4, damping=0.1)
    params = _params(model, 1)
    loss = F.cross_entropy(model(ft.train.x.double()), ft.train.y)
    g = _flat(torch.autograd.grad(loss, params, create_graph=True))
    v = torch.randn(2, module.num_params, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    expected = torch.stack([
        _flat(torch.autograd.grad(g @ vi, params, retain_graph=True)) for vi in v
    ]) + (5e-4 + 0.1) * v
    torch.testing.assert_close(module.hvp(v), expected, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_exact_cg_and_lissa_agree_on_the_head(ft):
    x, y = ft.task.test.x[:12], ft.task.test.y[:12]
    exact = ExactInfluence(ft.model, ft.train)  # weight decay 5e-4 only: ill-conditioned
    cg = CGInfluence(ft.model, ft.train, tol=1e-12)
    s_exact = exact.influences(x, y)
    assert _rel(cg.influences(x, y), s_exact) < 1e-3
    # LiSSA converges at rate 1 - lambda_min / scale, so compare at a useful damping.
    exact_d = ExactInfluence(ft.model, ft.train, damping=0.05)
    s_exact_d = exact_d.influences(x, y)
    full = LiSSAInfluence(ft.model, ft.train, damping=0.05, depth=300)
    assert _rel(full.influences(x, y), s_exact_d) < 1e-2
    stochastic = LiSSAInfluence(ft.model, ft.train, damping=0.05, depth=200, repeats=4,
                                lissa_batch_size=25, scale=full.scale)
    assert _rel(stochastic.influences(x, y), s_exact_d) < 0.2
    # and none of them is close to a wrong answer (e.g. the undamped system)
    assert _rel(s_exact_d, s_exact) > 0.05


def test_lissa_effective_damping_and_divergence(ft):
    v = ExactInfluence(ft.model, ft.train).train_gradients[:3]
    # Fixed point of LiSSA's own damping d is (H + s d I)^-1 v.
    lissa = LiSSAInfluence(ft.model, ft.train, depth=400, scale=5.0, lissa_damping=0.02)
    exact = ExactInfluence(ft.model, ft.train, damping=5.0 * 0.02)
    assert _rel(lissa.inverse_hvp(v), exact.inverse_hvp(v)) < 1e-3
    with pytest.raises(UserError, match="diverged"):
        LiSSAInfluence(ft.model, ft.train, depth=2000, scale=0.05).inverse_hvp(v)


def test_lissa_estimated_scale_follows_set_parameters(ft):
    lissa = LiSSAInfluence(ft.model, ft.train, depth=1)
    theta = 5.0 * lissa.theta  # sharper softmax: a different (smaller) loss Hessian
    model = copy.deepcopy(ft.model)
    torch.nn.utils.vector_to_parameters(theta.float(), model.head.parameters())
    fresh = LiSSAInfluence(model, ft.train, depth=1).scale
    assert abs(fresh / lissa.scale - 1) > 0.2  # the check below can tell them apart
    lissa.set_parameters(theta)
    assert lissa.scale == pytest.approx(fresh, rel=1e-4)
    fixed = LiSSAInfluence(ft.model, ft.train, depth=1, scale=7.0)
    fixed.set_parameters(theta)
    assert fixed.scale == 7.0  # a scale the caller chose stays


def test_cg_on_a_non_convex_block_asks_for_damping(ft):
    x, y = ft.task.test.x[:2], ft.task.test.y[:2]
    with pytest.raises(UserError, match="damping"):
        CGInfluence(ft.model, ft.train, unfrozen_blocks=1).influences(x, y)
    scores = CGInfluence(ft.model, ft.train, unfrozen_blocks=1, damping=3.0).influences(x, y)
    assert scores.shape == (2, len(ft.train)) and torch.isfinite(scores).all()


def test_leave_one_out_correlation_on_the_convex_head():
    features, _ = load_checkpoint(checkpoints().natural)
    result = validate_leave_one_out(features, images_per_class=20, num_removed=30,
                                    weight_decay=0.01)
    assert len(result.removed) == 30 and result.num_train == 100
    assert result.pearson >= 0.95, result.pearson
    # Sign convention: predicted = change in test loss when the image is removed.
    assert result.sign_agreement >= 0.9
    # Scale (the 1/n): actual ~ predicted, not n times off.
    slope = np.polyfit(result.predicted, result.actual, 1)[0]
    assert 0.5 < slope < 2.0, slope


def test_influence_sign_by_retraining_without_the_most_helpful_image(ft):
    module = ExactInfluence(copy.deepcopy(ft.model), ft.train, weight_decay=0.01)
    module.set_parameters(minimise(module, module.theta))
    x, y = ft.task.test.x[:1], ft.task.test.y[:1]
    scores = module.influences(x, y)[0]
    base = module.losses(x, y).item()
    for i in (int(scores.argmax()), int(scores.argmin())):
        weights = torch.ones(module.n, dtype=module.dtype)
        weights[i] = 0
        change = module.losses(x, y, minimise(module, module.theta, weights)).item() - base
        assert np.sign(change) == np.sign(float(scores[i])), (i, change, float(scores[i]))
        assert 0.25 < change / float(scores[i]) < 4.0  # a missing 1/n would be 50x off


def test_ranking_excludes_self_and_counts_class_matches():
    scores = torch.tensor([[9.0, 2.0, 1.0, 3.0], [0.5, 9.0, -4.0, 0.1],
                           [0.0, 0.0, 9.0, -1.0]])
    top = rank_training_images(scores, 2, "helpful", exclude=torch.tensor([0, 1, 2]))
    assert top.tolist() == [[3, 1], [0, 3], [0, 1]]
    assert rank_training_images(scores, 1, "harmful").flatten().tolist() == [2, 2, 3]
    assert rank_training_images(scores, 1, "abs").flatten().tolist() == [0, 1, 2]
    frac = class_match_fractions(scores, torch.tensor([0, 1, 0, 0]), torch.tensor([0, 1, 1]),
                                 k_max=10, exclude=torch.tensor([0, 1, 2]))
    assert frac.shape == (3, 3)  # k capped at the 3 other training images
    assert frac[0].tolist() == [1.0, 0.5, 2 / 3]
    assert frac[1].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(UserError, match="ranking"):
        rank_training_images(scores, 1, "best")


def test_study_table_and_examples(tmp_path):
    c = checkpoints()
    results = study_results(tmp_path, c.ft_natural, c.ft_robust, top_k=100,
                            targets_per_class=3, examples=4)
    table = class_match_table(results)
    assert set(table["source_label"]) == {"natural", "robust (l2 eps=0.5)"}
    test_rows = table[table["targets"] == "held-out test images"]
    train_rows = table[table["targets"] == "training images"]
    assert test_rows["k"].max() == 50 and train_rows["k"].max() == 49  # capped at n (-self)
    assert (table["n"] == 15).all() and (table["over"] != "seeds").all()
    assert ((table["lower"] <= table["mean"]) & (table["mean"] <= table["upper"])).all()
    assert table["mean"].between(0, 1).all()
    # k = n for held-out targets: every training image counted, 10 of 50 share the class.
    assert np.allclose(test_rows[test_rows["k"] == 50]["mean"], 0.2)
    ex = influence_examples(results)
    assert ex.test_labels.tolist() == [0, 1, 2, 3, 4]
    assert ex.top_images["natural"].shape == (5, 4, 1, 8, 8)


def test_bad_influence_requests_are_user_errors(ft):
    with pytest.raises(UserError, match="at most"):
        ExactInfluence(ft.model, ft.train, unfrozen_blocks=1)
    with pytest.raises(UserError, match="influence blocks"):
        make_influence("cg", ft.model, ft.train, unfrozen_blocks=4)
    with pytest.raises(UserError, match="influence method"):
        make_influence("newton", ft.model, ft.train)
    with pytest.raises(UserError, match="not allowed"):
        InfluenceStudy((checkpoints().ft_robust,), blocks=2)
    with pytest.raises(UserError, match="not a fine-tuned checkpoint"):
        load_finetune(checkpoints().natural)
