import json

import pytest
import torch

from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, build_model, load_checkpoint, save_checkpoint
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
    save_checkpoint(model, tmp_path / "ck", {"eps": 0.5, "seed": 0})
    loaded, meta = load_checkpoint(tmp_path / "ck")
    x = torch.rand(8, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert meta["eps"] == 0.5 and meta["model"]["arch"] == "cnn-small" and len(meta["sha256"]) == 64


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
