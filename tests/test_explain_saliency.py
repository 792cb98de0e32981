"""Saliency: input gradients and SmoothGrad, their shape, determinism, and the ink metric."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from explain_fixtures import checkpoints
from robust_transfer.data import ImageSet, load_task
from robust_transfer.errors import UserError
from robust_transfer.explain import compare_saliency, ink_mass_fraction, input_gradient, saliency
from robust_transfer.explain.saliency import pick_images, saliency_for_checkpoints, smoothgrad
from robust_transfer.models import load_checkpoint


@pytest.fixture(scope="module")
def model_and_images():
    model, _ = load_checkpoint(checkpoints().robust)
    test = load_task("digits-0to4").test
    return model, test.subset(pick_images(test, 2, seed=0))


def test_input_gradient_is_each_images_own_loss_gradient(model_and_images):
    model, images = model_and_images
    model.head.train()  # a mode the explanation must not change
    g = input_gradient(model, images.x, images.y)
    assert g.shape == images.x.shape
    for i in (0, 5):
        x = images.x[i : i + 1].clone().requires_grad_(True)
        model.eval()
        loss = F.cross_entropy(model(x), images.y[i : i + 1])
        (expected,) = torch.autograd.grad(loss, x)
        model.head.train()
        torch.testing.assert_close(g[i : i + 1], expected, rtol=1e-4, atol=1e-7)
    assert model.head.training and not model.blocks.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_maps_have_the_input_shape_and_are_deterministic(model_and_images):
    model, images = model_and_images
    for method in ("gradient", "smoothgrad"):
        a = saliency(model, images.x, images.y, method)
        b = saliency(model, images.x, images.y, method)
        assert a.shape == images.x.shape and torch.equal(a, b)
    other_seed = smoothgrad(model, images.x, images.y, samples=8, seed=1)
    assert not torch.equal(other_seed, smoothgrad(model, images.x, images.y, samples=8, seed=0))
    # sigma 0: every noisy copy is the image itself, so SmoothGrad is the plain gradient
    torch.testing.assert_close(smoothgrad(model, images.x, images.y, samples=3, sigma=0.0),
                               input_gradient(model, images.x, images.y), rtol=1e-5, atol=1e-8)
    with pytest.raises(UserError, match="saliency method"):
        saliency(model, images.x, images.y, "lrp")


def test_ink_mass_fraction_by_hand():
    x = torch.zeros(2, 1, 2, 2)
    x[:, 0, 0, 0] = 1.0  # one ink pixel per image
    s = torch.zeros(2, 1, 2, 2)
    s[0, 0, 0, 0], s[0, 0, 1, 1] = -3.0, 1.0  # 3 of 4 on the ink
    s[1, 0, 0, 1] = 2.0  # all off the ink
    assert ink_mass_fraction(s, x).tolist() == [0.75, 0.0]


def test_compare_and_checkpoint_saliency_table():
    c = checkpoints()
    comp = saliency_for_checkpoints([c.natural, c.robust], per_class=3, methods=("gradient",))
    assert list(comp.maps) == [("natural", "gradient"), ("robust (l2 eps=0.5)", "gradient")]
    rows = comp.table()
    assert [r["images"] for r in rows] == [15, 15]
    assert all(0 <= r["ink mass fraction"] <= 1 for r in rows)
    assert comp.labels.tolist() == sorted(comp.labels.tolist())
    direct = compare_saliency({"m": load_checkpoint(c.natural)[0]},
                              ImageSet(comp.images, comp.labels), ("gradient",))
    torch.testing.assert_close(direct.maps[("m", "gradient")],
                               comp.maps[("natural", "gradient")])
    with pytest.raises(UserError, match="explain models of one task together"):
        saliency_for_checkpoints([c.natural, c.ft_natural])
