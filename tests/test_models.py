import json

import pytest
import torch
import torch.nn.functional as F

from robust_transfer.errors import UserError
from robust_transfer.models import (
    ModelSpec,
    SourceCard,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from robust_transfer.models.checkpoint import META, WEIGHTS


@pytest.mark.parametrize("arch,size", [("cnn-small", 8), ("cnn-medium", 32)])
def test_blocks_head_features_and_logits(arch, size):
    model = build_model(ModelSpec(arch, 7, 3, (0.5,) * 3, (0.25,) * 3), seed=0).eval()
    x = torch.rand(4, 3, size, size)
    assert [n for n, _ in model.blocks.named_children()][0] == "block1"
    assert model.features(x).shape == (4, model.feature_dim)
    assert model(x).shape == (4, 7)
    # Normalisation is inside the model: it equals a model without it on normalised input.
    manual = model.head(model.pool(model.blocks((x - 0.5) / 0.25)).flatten(1))
    assert torch.allclose(model(x), manual, atol=1e-6)


def test_seeded_build_is_reproducible():
    a, b = build_model(ModelSpec(), seed=1), build_model(ModelSpec(), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = build_model(ModelSpec(num_classes=5), seed=0)
    model.train()(torch.rand(16, 1, 8, 8))  # move BN running stats away from defaults
    model.eval()
    save_checkpoint(model, tmp_path / "ck", SourceCard(eps=0.5, seed=0))
    loaded, card = load_checkpoint(tmp_path / "ck")
    x = torch.rand(8, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert card.eps == 0.5 and card.model.arch == "cnn-small" and len(card.sha256) == 64


def test_missing_and_corrupt_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(build_model(ModelSpec()), tmp_path / "ck")
    (tmp_path / "ck" / WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")
    save_checkpoint(build_model(ModelSpec()), tmp_path / "ck2")
    (tmp_path / "ck2" / META).write_text(json.dumps({"model": {"arch": "cnn-small"}}))
    with pytest.raises(UserError, match="corrupt checkpoint metadata"):
        load_checkpoint(tmp_path / "ck2")


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="cnn-small"):
        build_model(ModelSpec(arch="resnet-9000"))


# -- the split(k) / block_names / forward_to seam ---------------------------------------------


def _trained_bn_model(arch: str, size: int):
    """A model in eval mode whose BatchNorm running statistics are not the defaults."""
    model = build_model(ModelSpec(arch, 7, 3, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)), seed=0)
    with torch.no_grad():
        model.train()(torch.rand(16, 3, size, size))
    return model.eval(), torch.rand(5, 3, size, size)


SPLIT_CASES = [("cnn-small", 8, k) for k in (0, 1, 2, 3, None, "all")] + [
    ("cnn-medium", 32, k) for k in (0, 2, 4)
]


@pytest.mark.parametrize("arch,size,k", SPLIT_CASES)
def test_split_composes_to_the_model_and_shares_its_parameters(arch, size, k):
    model, x = _trained_bn_model(arch, size)
    names = model.block_names
    prefix, suffix = model.split(k)
    with torch.no_grad():
        assert torch.equal(suffix(prefix(x)), model(x))
        if k == 0:
            assert torch.equal(prefix(x), model.features(x))
    n_train = len(names) if k in (None, "all") else k
    trained = [getattr(model.blocks, n) for n in names[len(names) - n_train:]] + [model.head]
    expected = {id(p) for m in trained for p in m.parameters()}
    # The very same tensors (not copies): the suffix holds exactly head + last k blocks,
    # the prefix exactly the rest, and together they hold every parameter once.
    assert {id(p) for p in suffix.parameters()} == expected
    assert len(list(suffix.parameters())) == len(expected)
    assert {id(p) for p in prefix.parameters()} == {id(p) for p in model.parameters()} - expected
    if n_train == len(names):
        assert [n for n, _ in prefix.named_children()] == ["normalizer"]
    # Freezing the prefix freezes the model's own parameters.
    prefix.requires_grad_(False)
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected


def test_block_names_are_ordered():
    assert build_model(ModelSpec()).block_names == ["block1", "block2", "block3"]
    medium = build_model(ModelSpec("cnn-medium", 10, 3, (0.5,) * 3, (0.5,) * 3))
    assert medium.block_names == ["block1", "block2", "block3", "block4"]


@pytest.mark.parametrize("bad", [-1, 4, 1.5, True, "some"])
def test_bad_split_is_a_user_error_naming_the_range(bad):
    with pytest.raises(UserError, match=r"0\.\.3 \(0 = head only\) or 'all'"):
        build_model(ModelSpec()).split(bad)


def test_forward_to_equals_a_manual_computation():
    model, x = _trained_bn_model("cnn-small", 8)
    h = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.25, 0.2, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        for name, stride in zip(model.block_names, (1, 2, 2), strict=True):
            conv, bn, _ = getattr(model.blocks, name)
            h = F.conv2d(h, conv.weight, stride=stride, padding=1)
            h = (h - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
                bn.running_var.view(1, -1, 1, 1) + bn.eps)
            h = torch.relu(h * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
            torch.testing.assert_close(model.forward_to(x, name), h, rtol=1e-5, atol=1e-6)
        pooled = model.forward_to(x, "block3").mean(dim=(2, 3))
        torch.testing.assert_close(pooled, model.features(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="unknown block 'block9'; allowed: block1, block2, block3"):
        model.forward_to(x, "block9")
