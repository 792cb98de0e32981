"""Triggers, poisoning and backdoor metrics: exact trigger application, poisoned indices that
follow the rate and the seed, ASR that leaves target-class images out, and a poisoned model
whose ASR is high where a clean model's is not."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import tiny_source
from robust_transfer.backdoors.metrics import backdoor_metrics
from robust_transfer.backdoors.source import gallery_examples, train_backdoor_source
from robust_transfer.data import load_task
from robust_transfer.data.poison import BackdoorConfig, poison, poison_count
from robust_transfer.data.triggers import TRIGGERS, make_trigger
from robust_transfer.errors import UserError
from robust_transfer.train import SourceConfig, TrainConfig


def test_badnets_changes_only_the_patch_pixels():
    x = torch.rand(6, 1, 8, 8) * 0.9
    out = make_trigger("badnets", (1, 8, 8)).apply(x)
    changed = (out != x).any(0)[0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[6:, 6:] = True  # 2x2 bottom-right on 8x8
    assert torch.equal(changed, expected)
    assert torch.all(out[:, :, 6:, 6:] == 1.0)
    big = make_trigger("badnets", (3, 32, 32))
    assert big.mask.sum() == 9 and big.mask[29:, 29:].all()  # 3x3 bottom-right on 32x32
    corner = make_trigger("badnets", (1, 8, 8), corner="top-left")
    assert corner.mask[:2, :2].all() and corner.mask.sum() == 4


def test_blend_and_sig_equal_their_formulas():
    x = torch.rand(5, 3, 8, 8)
    blended = make_trigger("blended", (3, 8, 8), seed=3)
    assert torch.allclose(blended.apply(x), 0.8 * x + 0.2 * blended.pattern)
    assert torch.equal(blended.pattern, make_trigger("blended", (3, 8, 8), seed=3).pattern)
    assert not torch.equal(blended.pattern, make_trigger("blended", (3, 8, 8), seed=4).pattern)
    sig = make_trigger("sig", (1, 8, 32))
    v = (20 / 255) * torch.sin(2 * math.pi * torch.arange(32) * 6 / 32)
    assert torch.allclose(sig.apply(x[:, :1, :, :].repeat(1, 1, 1, 4)),
                          (x[:, :1].repeat(1, 1, 1, 4) + v).clamp(0, 1))
    for name in TRIGGERS:
        out = make_trigger(name, (3, 8, 8)).apply(x)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_trigger_and_config_errors():
    with pytest.raises(UserError, match="does not fit"):
        make_trigger("badnets", (1, 8, 8), size=9)
    with pytest.raises(UserError, match="unknown trigger"):
        make_trigger("magic", (1, 8, 8))  # (wanet is a trigger now)
    for rate in (0.0, -0.1, 1.5):
        with pytest.raises(UserError, match="poison rate"):
            BackdoorConfig(rate=rate)
    with pytest.raises(UserError, match="does not exist"):
        SourceConfig(task="digits-0to4", backdoor=BackdoorConfig(target=5))


def test_poisoned_indices_follow_rate_and_seed():
    train = load_task("digits-0to4").train
    cfg = BackdoorConfig("badnets", rate=0.1, target=0, seed=1)
    data, index = poison(train, cfg, 5)
    assert len(index) == round(0.1 * len(train)) == poison_count(train.y, cfg)
    assert torch.all(train.y[index] != 0) and torch.all(data.y[index] == 0)
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[index] = False
    assert torch.equal(data.x[rest], train.x[rest]) and torch.equal(data.y[rest], train.y[rest])
    assert torch.equal(data.x[index], cfg.trigger((1, 8, 8)).apply(train.x[index]))
    assert torch.equal(poison(train, cfg, 5)[1], index)
    assert not torch.equal(poison(train, BackdoorConfig(rate=0.1, seed=2), 5)[1], index)
    all_to_all, idx2 = poison(train, BackdoorConfig(rate=0.2, labels="all-to-all"), 5)
    assert torch.equal(all_to_all.y[idx2], (train.y[idx2] + 1) % 5)


def test_clean_label_poisons_only_target_class_images():
    train = load_task("digits-0to4").train
    data, index = poison(train, BackdoorConfig("sig", rate=0.5, target=2, clean_label=True), 5)
    assert torch.all(train.y[index] == 2)
    assert len(index) == round(0.5 * int((train.y == 2).sum()))
    assert torch.equal(data.y, train.y)  # labels untouched
    assert not torch.equal(data.x[index], train.x[index])


class _Constant(nn.Module):
    """Predicts class `c` for every image (a model that is 'fully backdoored' to c)."""

    def __init__(self, c: int, k: int = 5) -> None:
        super().__init__()
        self.c, self.k = c, k
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.c), self.k).float() + self.dummy


def test_asr_excludes_target_class_images():
    y = torch.tensor([0, 0, 0, 1, 2, 3, 4, 1])
    x = torch.rand(len(y), 1, 8, 8)
    trigger = make_trigger("badnets", (1, 8, 8))
    m = backdoor_metrics(_Constant(0), x, y, trigger, target=0)
    # target-class images predicted as 0 would count for RA if they were included
    assert m["asr"] == 1.0 and m["ra"] == 0.0 and m["n_triggered"] == 5
    assert m["clean_accuracy"] == pytest.approx(3 / 8)
    m1 = backdoor_metrics(_Constant(1), x, y, trigger, target=1)
    assert m1["asr"] == 1.0 and m1["n_triggered"] == 6
    agnostic = backdoor_metrics(_Constant(3), x, y, trigger, target=None)
    assert agnostic["asr_label"] == 3 and agnostic["asr"] == 1.0 and agnostic["n_triggered"] == 8
    assert agnostic["ra"] == pytest.approx(1 / 8)


def test_metrics_restore_each_module_mode():
    model, _ = tiny_source(epochs=1)
    model.train()
    model.blocks[0].eval()
    backdoor_metrics(model, torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long),
                     make_trigger("badnets", (1, 8, 8)), 0, batch_size=3)
    assert model.training and not model.blocks[0].training


@pytest.fixture(scope="module")
def poisoned_source():
    cfg = SourceConfig(task="synthetic-0to4", train=TrainConfig(epochs=10),
                       backdoor=BackdoorConfig(rate=0.3, patch_size=3))
    return train_backdoor_source(cfg)


def test_poisoned_model_reaches_high_asr_and_a_clean_model_does_not(poisoned_source):
    model, card = poisoned_source
    m = card.metrics
    assert m["asr"] >= 0.9 and m["clean_accuracy"] >= 0.9
    assert m["poisoned_count"] == len(card.backdoor["poisoned_indices"]) == 63
    task = load_task("synthetic-0to4")
    trigger = BackdoorConfig(patch_size=3).trigger(task.input_shape)
    clean_model, _ = tiny_source(epochs=10)
    clean = backdoor_metrics(clean_model, task.test.x, task.test.y, trigger, 0)
    assert clean["asr"] < 0.3 and clean["ra"] > 0.6
    # an identity "trigger" is ignored by construction: the poisoned model shows no ASR then
    class _Identity:
        name = "identity"

        def apply(self, x):
            return x

    assert backdoor_metrics(model, task.test.x, task.test.y, _Identity(), 0)["asr"] < 0.3


def test_clean_recipe_dict_is_unchanged_and_gallery_interleaves_classes():
    assert "backdoor" not in SourceConfig().to_dict()
    assert SourceConfig(backdoor={"rate": 0.2}).backdoor == BackdoorConfig(rate=0.2)
    idx = gallery_examples(torch.tensor([0, 1, 1, 2, 2, 0, 1]), 0, 3)
    assert idx.tolist() == [1, 3, 2]
