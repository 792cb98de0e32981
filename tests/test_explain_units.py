"""Unit analysis (Szegedy et al. 2014 sec. 3): rankings against brute force, purity."""

from __future__ import annotations

import pytest
import torch

from explain_fixtures import checkpoints
from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.explain import layer_activations, unit_analysis
from robust_transfer.explain.units import majority_fraction, random_directions
from robust_transfer.models import load_checkpoint


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(checkpoints().natural)[0]


def _brute_force_top(model, x, layer, direction, k):
    """One image at a time, layer output by hand, sorted in Python."""
    scores = []
    for i in range(len(x)):
        h = model.normalizer(x[i : i + 1])
        for name, block in model.blocks.named_children():
            h = block(h)
            if name == layer:
                break
        phi = h.mean(dim=(2, 3))[0].double()
        scores.append((-(phi @ direction).item(), i))
    return [i for _, i in sorted(scores)[:k]]


@pytest.mark.parametrize("layer", ["block2", "features"])
def test_unit_and_direction_rankings_match_brute_force(model, layer):
    images = load_task("digits-0to4").test
    images = images.subset(torch.arange(120))
    result = unit_analysis(model, images, layer, k=7, seed=3)
    bf_layer = "block3" if layer == "features" else layer
    with torch.no_grad():
        for r in (0, 5):
            unit = torch.zeros(result.directions.shape[1], dtype=torch.float64)
            unit[int(result.units[r])] = 1.0
            assert result.unit_top[r].tolist() == _brute_force_top(model, images.x, bf_layer,
                                                                   unit, 7)
            assert result.direction_top[r].tolist() == _brute_force_top(
                model, images.x, bf_layer, result.directions[r], 7)
    expected = majority_fraction(images.y[result.unit_top])
    assert torch.equal(result.unit_purity, expected)
    s = result.summary()
    assert s["units"] + s["dead units (excluded)"] == result.directions.shape[1]
    assert 0 < s["unit purity"] <= 1 and 0 < s["random-direction purity"] <= 1


def test_features_layer_is_the_penultimate_representation(model):
    x = load_task("digits-0to4").test.x[:10]
    torch.testing.assert_close(layer_activations(model, x, "features"), model.features(x))


def test_purity_and_directions_by_hand():
    labels = torch.tensor([[1, 1, 2, 1], [0, 1, 2, 3]])
    assert majority_fraction(labels).tolist() == [0.75, 0.25]
    d = random_directions(16, 5, seed=0)
    assert torch.allclose(d.norm(dim=1), torch.ones(5, dtype=torch.float64))
    assert torch.equal(d, random_directions(16, 5, seed=0))


def test_bad_layer_and_k(model):
    images = load_task("digits-0to4").test
    with pytest.raises(UserError, match="unknown layer 'block9'"):
        unit_analysis(model, images, "block9")
    with pytest.raises(UserError, match="top-k"):
        unit_analysis(model, images, "block1", k=0)
