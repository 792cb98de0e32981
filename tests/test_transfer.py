import copy

import pytest
import torch

from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint
from robust_transfer.train import frozen_blocks
from robust_transfer.transfer import FinetuneConfig, finetune
from robust_transfer.transfer.run import finetune_from_checkpoint

TARGET = "synthetic-5to9"


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("unfrozen", [0, 1])
def test_frozen_blocks_bitwise_unchanged_and_bn_stays_in_eval(source_dir, unfrozen):
    model, _ = load_checkpoint(source_dir)
    before = {name: _state(b) for name, b in model.blocks.named_children()}
    head_before = model.head.weight.clone()
    seen_modes = []
    original_forward = model.blocks.block1.forward

    def spy(x):
        seen_modes.append(model.blocks.block1[1].training)
        return original_forward(x)

    model.blocks.block1.forward = spy
    finetune(model, FinetuneConfig(TARGET, images_per_class=5, unfrozen_blocks=unfrozen,
                                   epochs=2, seed=0))
    names = list(before)
    n_frozen = len(names) - unfrozen
    for name in names[:n_frozen]:  # weights AND BatchNorm running stats identical
        after = _state(getattr(model.blocks, name))
        assert all(torch.equal(before[name][k], after[k]) for k in after), name
    for name in names[n_frozen:]:
        after = _state(getattr(model.blocks, name))
        assert not torch.equal(before[name][f"{0}.weight"], after["0.weight"])
    assert model.head.out_features == 5 and not torch.equal(head_before, model.head.weight)
    assert seen_modes and not any(seen_modes)  # block1 (frozen) BN never in train mode
    assert len(frozen_blocks(model)) == n_frozen


def test_finetune_records_every_epoch_and_is_deterministic(source_dir):
    model, _ = load_checkpoint(source_dir)
    cfg = FinetuneConfig(TARGET, images_per_class=3, unfrozen_blocks="all", epochs=3, seed=1)
    a = finetune(copy.deepcopy(model), cfg)
    b = finetune(copy.deepcopy(model), cfg)
    assert [r["epoch"] for r in a] == [1, 2, 3]
    assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]
    assert a[0]["train_images"] == 15
    c = finetune(copy.deepcopy(model), FinetuneConfig(TARGET, 3, "all", 3, seed=2))
    assert [r["train_loss"] for r in a] != [r["train_loss"] for r in c]


def test_finetune_learns_the_target(source_dir):
    rows = finetune_from_checkpoint(source_dir, FinetuneConfig(TARGET, "all", 0, epochs=5))
    assert rows[-1]["test_accuracy"] > 0.6  # 5 classes: chance is 0.2
    assert rows[-1]["source_eps"] == 0.0 and rows[-1]["images_per_class"] == "all"


def test_finetune_saves_a_loadable_checkpoint(source_dir, tmp_path):
    rows = finetune_from_checkpoint(source_dir, FinetuneConfig(TARGET, 2, 0, epochs=2),
                                    out_dir=tmp_path / "ft")
    model, card = load_checkpoint(tmp_path / "ft")
    assert card.role == "finetune" and card.finetune["images_per_class"] == 2
    assert card.metrics["test_accuracy"] == rows[-1]["test_accuracy"]
    assert model.head.out_features == 5


@pytest.mark.parametrize("bad", [dict(images_per_class=-1), dict(unfrozen_blocks="some"),
                                 dict(target_task="digits-10to14")])
def test_bad_finetune_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        FinetuneConfig(**{"target_task": TARGET, **bad})


def test_too_many_unfrozen_blocks_is_a_user_error(source_dir):
    model, _ = load_checkpoint(source_dir)
    with pytest.raises(UserError, match="0..3"):
        finetune(model, FinetuneConfig(TARGET, 2, 7, epochs=1))
