"""ResNet-18/50 and PreActResNet-18: published key layouts, parameter counts, and the block
seam (split / forward_to / features / reset_head / freezing) every other layer relies on."""

from __future__ import annotations

import pytest
import torch

from robust_transfer.cli import main
from robust_transfer.data import ImageSet
from robust_transfer.errors import UserError
from robust_transfer.models import (
    ModelSpec,
    SourceCard,
    build_model,
    load_checkpoint,
    num_blocks,
    save_checkpoint,
)
from robust_transfer.train import TrainConfig, fit
from robust_transfer.train.freeze import freeze_all_but_last, set_train_mode
from robust_transfer.train.loop import batch_bounds

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _keys(layout: str) -> list[str]:
    """Expand `name:conv|bn|fc` lines into state-dict keys (BatchNorm has five)."""
    keys = []
    for line in layout.split():
        name, kind = line.split(":")
        suffixes = {"conv": ("weight",), "bn": BN, "fc": ("weight", "bias")}[kind]
        keys += [f"{name}.{s}" for s in suffixes]
    return keys


# torchvision resnet18's state dict, module by module, in order (REFERENCES.md).
RESNET18_LAYOUT = """
conv1:conv bn1:bn
layer1.0.conv1:conv layer1.0.bn1:bn layer1.0.conv2:conv layer1.0.bn2:bn
layer1.1.conv1:conv layer1.1.bn1:bn layer1.1.conv2:conv layer1.1.bn2:bn
layer2.0.conv1:conv layer2.0.bn1:bn layer2.0.conv2:conv layer2.0.bn2:bn
layer2.0.downsample.0:conv layer2.0.downsample.1:bn
layer2.1.conv1:conv layer2.1.bn1:bn layer2.1.conv2:conv layer2.1.bn2:bn
layer3.0.conv1:conv layer3.0.bn1:bn layer3.0.conv2:conv layer3.0.bn2:bn
layer3.0.downsample.0:conv layer3.0.downsample.1:bn
layer3.1.conv1:conv layer3.1.bn1:bn layer3.1.conv2:conv layer3.1.bn2:bn
layer4.0.conv1:conv layer4.0.bn1:bn layer4.0.conv2:conv layer4.0.bn2:bn
layer4.0.downsample.0:conv layer4.0.downsample.1:bn
layer4.1.conv1:conv layer4.1.bn1:bn layer4.1.conv2:conv layer4.1.bn2:bn
fc:fc
"""

# Wong et al.'s fast_adversarial PreActResNet-18.
PREACT_LAYOUT = """
conv1:conv
layer1.0.bn1:bn layer1.0.conv1:conv layer1.0.bn2:bn layer1.0.conv2:conv
layer1.1.bn1:bn layer1.1.conv1:conv layer1.1.bn2:bn layer1.1.conv2:conv
layer2.0.bn1:bn layer2.0.conv1:conv layer2.0.bn2:bn layer2.0.conv2:conv layer2.0.shortcut.0:conv
layer2.1.bn1:bn layer2.1.conv1:conv layer2.1.bn2:bn layer2.1.conv2:conv
layer3.0.bn1:bn layer3.0.conv1:conv layer3.0.bn2:bn layer3.0.conv2:conv layer3.0.shortcut.0:conv
layer3.1.bn1:bn layer3.1.conv1:conv layer3.1.bn2:bn layer3.1.conv2:conv
layer4.0.bn1:bn layer4.0.conv1:conv layer4.0.bn2:bn layer4.0.conv2:conv layer4.0.shortcut.0:conv
layer4.1.bn1:bn layer4.1.conv1:conv layer4.1.bn2:bn layer4.1.conv2:conv
bn:bn linear:fc
"""
NORMALISER = ["normalizer.mean", "normalizer.std"]


def _model(arch: str, classes: int = 10, seed: int = 0):
    return build_model(ModelSpec(arch, classes, 3, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)), seed=seed)


@pytest.fixture(scope="module")
def resnet50():
    return _model("resnet50", 1000)


def test_resnet18_keys_are_torchvision_keys_in_order():
    model = _model("resnet18", 1000)
    assert list(model.state_dict()) == NORMALISER + _keys(RESNET18_LAYOUT)
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's count


def test_preact_resnet18_keys_are_the_fast_adversarial_layout():
    assert list(_model("preact-resnet18").state_dict()) == NORMALISER + _keys(PREACT_LAYOUT)
    # BackdoorBench's variant: the same keys without the final BN.
    nobn = PREACT_LAYOUT.replace("bn:bn linear:fc", "linear:fc")
    model = _model("preact-resnet18-nobn")
    assert list(model.state_dict()) == NORMALISER + _keys(nobn)
    model, x = _trained(model)
    prefix, suffix = model.split(1)
    with torch.no_grad():
        assert torch.equal(suffix(prefix(x)), model(x))
        pooled = model.forward_to(x, "layer4_1").mean((2, 3))
        assert torch.allclose(model.features(x), pooled, atol=1e-6)


def test_resnet50_bottlenecks_have_torchvision_names_shapes_and_count(resnet50):
    state = resnet50.state_dict()
    assert sum(p.numel() for p in resnet50.parameters()) == 25_557_032  # torchvision's count
    depths = {1: 3, 2: 4, 3: 6, 4: 3}
    for stage, depth in depths.items():
        planes = 64 * 2 ** (stage - 1)
        c_in = 64 if stage == 1 else planes * 2
        for i in range(depth):
            p = f"layer{stage}.{i}."
            first_in = c_in if i == 0 else planes * 4
            assert state[p + "conv1.weight"].shape == (planes, first_in, 1, 1)
            assert state[p + "conv2.weight"].shape == (planes, planes, 3, 3)
            assert state[p + "conv3.weight"].shape == (planes * 4, planes, 1, 1)
            for bn, width in (("bn1", planes), ("bn2", planes), ("bn3", planes * 4)):
                assert all(f"{p}{bn}.{s}" in state for s in BN)
                assert state[f"{p}{bn}.weight"].shape == (width,)
            has_downsample = f"{p}downsample.0.weight" in state
            assert has_downsample == (i == 0)
        assert state[f"layer{stage}.0.downsample.0.weight"].shape == (planes * 4, c_in, 1, 1)
    # torchvision's "v1.5": the stride sits on the 3x3 conv of the first bottleneck.
    assert resnet50.layer2[0].conv2.stride == (2, 2) and resnet50.layer2[0].conv1.stride == (1, 1)
    assert state["fc.weight"].shape == (1000, 2048) and state["conv1.weight"].shape == (64, 3, 7, 7)
    n_keys = sum(5 * (3 + (i == 0)) + 3 + (i == 0) for d in depths.values() for i in range(d))
    assert len(state) == 2 + 6 + n_keys + 2


def test_block_counts_stem_plus_residual_blocks(resnet50):
    assert num_blocks("resnet18") == num_blocks("preact-resnet18") == 9
    assert num_blocks("resnet50") == 17 and len(resnet50.block_names) == 17
    assert _model("resnet18").block_names == [
        "stem", "layer1_0", "layer1_1", "layer2_0", "layer2_1", "layer3_0", "layer3_1",
        "layer4_0", "layer4_1"]
    with pytest.raises(UserError, match="unknown arch"):
        num_blocks("resnet-9000")


def _trained(model, size: int = 32):
    """Eval mode with non-default BatchNorm statistics, and a batch of 2 images."""
    with torch.no_grad():
        model.train()(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1)))
    return model.eval(), torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch,ks", [("resnet18", range(10)), ("preact-resnet18", (0, 1, 5, 9)),
                                     ("resnet50", (0, 1, 3, 16, "all"))])
def test_split_composes_and_holds_exactly_the_last_k_blocks(arch, ks, resnet50):
    model, x = _trained(resnet50 if arch == "resnet50" else _model(arch))
    names = model.block_names
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(model.head(model.features(x)), logits)
        for k in ks:
            prefix, suffix = model.split(k)
            assert torch.equal(suffix(prefix(x)), logits), k
            n = len(names) if k == "all" else k
            trained = [getattr(model.blocks, b) for b in names[len(names) - n:]] + [model.head]
            expected = {id(p) for m in trained for p in m.parameters()}
            if arch == "preact-resnet18" and n > 0:  # the final BN-ReLU runs after the blocks
                expected |= {id(p) for p in model.bn.parameters()}
            assert {id(p) for p in suffix.parameters()} == expected, k
            assert {id(p) for p in prefix.parameters()} | expected == {
                id(p) for p in model.parameters()}
        assert torch.equal(model.split(0)[0](x), model.features(x))
        h = model.forward_to(x, names[-1])
        assert h.shape[1] == model.feature_dim
        stem = model.forward_to(x, "stem")
        assert torch.equal(model.blocks.stem(model.normalizer(x)), stem)


def test_state_dict_has_no_duplicate_keys_from_the_block_view():
    model = _model("resnet18")
    assert not any(k.startswith(("blocks.", "head.")) for k in model.state_dict())
    assert model.head is model.fc and model.blocks.layer4_1 is model.layer4[1]


def test_reset_head_replaces_fc_reproducibly():
    a, b = _model("resnet18"), _model("resnet18")
    a.reset_head(7, torch.Generator().manual_seed(3))
    b.reset_head(7, torch.Generator().manual_seed(3))
    assert a.fc.out_features == 7 and a.head is a.fc and a.spec.num_classes == 7
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert "fc.weight" in a.state_dict() and a.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 7)


def test_frozen_means_frozen_including_the_final_preact_bn():
    model, x = _trained(_model("preact-resnet18"))
    freeze_all_but_last(model, 0)
    set_train_mode(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(x).sum().backward()
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.linear.weight.grad is not None and model.bn.weight.grad is None
    freeze_all_but_last(model, 1)
    set_train_mode(model)
    assert model.bn.training and model.layer4[1].bn1.training and not model.layer4[0].bn1.training


def test_checkpoint_round_trip_and_seeded_init(tmp_path):
    model, x = _trained(_model("resnet18", seed=4))
    again = _model("resnet18", seed=4)
    assert torch.equal(again.fc.weight, _model("resnet18", seed=4).fc.weight)
    save_checkpoint(model, tmp_path / "ck", SourceCard(role="source"))
    loaded, card = load_checkpoint(tmp_path / "ck")
    assert card.model.arch == "resnet18"
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_train_and_finetune_a_resnet18_through_the_cli(tmp_path, capsys):
    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        return exit_info.value.code or 0, capsys.readouterr().err

    src, ft = tmp_path / "src", tmp_path / "ft"
    assert run("train", "--task", "synthetic-0to4", "--arch", "resnet18", "--epochs", "1",
               "--batch-size", "128", "--out", src)[0] == 0
    source, card = load_checkpoint(src)
    assert card.model.arch == "resnet18" and card.model.input_size == 8
    assert list(source.state_dict())[2:4] == ["conv1.weight", "bn1.weight"]
    assert run("finetune", src, "--task", "synthetic-5to9", "--images-per-class", "2",
               "--unfrozen-blocks", "2", "--epochs", "1", "--out", ft)[0] == 0
    tuned, _ = load_checkpoint(ft)
    assert torch.equal(tuned.layer3[1].conv1.weight, source.layer3[1].conv1.weight)  # frozen
    assert not torch.equal(tuned.layer4[1].conv1.weight, source.layer4[1].conv1.weight)
    code, err = run("finetune", src, "--task", "synthetic-5to9", "--unfrozen-blocks", "10")
    assert code == 2 and "0..9 (0 = head only)" in err and len(err.strip().splitlines()) == 1


def test_spec_checks_unfrozen_blocks_against_the_resnet():
    from robust_transfer.transfer.spec import parse_spec

    spec = {"source": {"task": "synthetic-0to4", "arch": "resnet50"}, "sources": [{"eps": 0}],
            "targets": ["synthetic-5to9"], "images_per_class": [1], "unfrozen_blocks": [17],
            "epochs": 1, "seeds": [0]}
    assert parse_spec(spec).unfrozen_blocks == (17,)
    with pytest.raises(UserError, match=r"more than arch 'resnet50' has \(17\); use 0..17"):
        parse_spec({**spec, "unfrozen_blocks": [18]})


@pytest.mark.parametrize("n,size,bounds", [
    (65, 32, [(0, 32), (32, 65)]), (64, 32, [(0, 32), (32, 64)]), (1, 32, [(0, 1)]),
    (33, 32, [(0, 33)]), (10, 3, [(0, 3), (3, 6), (6, 10)]), (0, 4, [])])
def test_batch_bounds_fold_a_last_single_example_into_the_batch_before(n, size, bounds):
    assert batch_bounds(n, size) == bounds


def test_a_resnet18_at_32x32_trains_when_one_image_would_be_left_over():
    """torchvision's ResNet-18 ends in a 1x1 stage on 32x32 images, where BatchNorm cannot
    train on one image; 5 images in batches of 4 used to end in that batch of one."""
    spec = ModelSpec("resnet18", num_classes=3, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
                     input_size=32)
    model = build_model(spec, seed=0)
    gen = torch.Generator().manual_seed(0)
    data = ImageSet(torch.rand(5, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0, 1]))
    history = fit(model, data, TrainConfig(epochs=1, batch_size=4))
    assert len(history) == 1 and history[0]["train_loss"] > 0
