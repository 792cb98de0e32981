"""ANP (Wu & Wang 2021): the mask hooks against an independent computation, the model left
unchanged (hooks removed, flags restored) on success and on failure, pruning by threshold by
hand, the CLI's input errors, and the digits goal (10% BadNets: ASR < 10%, C-Acc within 3
points)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_source
from robust_transfer.backdoors.anp import (
    ANPConfig,
    NeuronPerturbation,
    batch_norms,
    neuron_masks,
    prune_by_threshold,
)
from robust_transfer.backdoors.defenses import DefenseConfig, clean_subset, defend
from robust_transfer.backdoors.metrics import backdoor_metrics
from robust_transfer.backdoors.source import train_backdoor_source
from robust_transfer.data import load_task
from robust_transfer.data.datasets import ImageSet
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.train import SourceConfig, TrainConfig


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_mask_hook_equals_scaled_batchnorm_in_train_mode():
    model, _ = tiny_source(epochs=1)
    x = load_task("synthetic-0to4").test.x[:16]
    masks = {name: torch.rand(bn.num_features, generator=torch.Generator().manual_seed(i))
             for i, (name, bn) in enumerate(batch_norms(model).items())}
    reference = copy.deepcopy(model).train()  # batch statistics, as their mask_train
    for name, bn in batch_norms(reference).items():
        bn.weight.data *= masks[name]
    expected = reference(x)
    hooks = [NeuronPerturbation(bn) for bn in batch_norms(model).values()]
    for h, m in zip(hooks, masks.values(), strict=True):
        h.mask.data.copy_(m)
    model.eval()
    assert torch.allclose(model(x), expected, atol=1e-5)
    for h in hooks:  # noise on: scale (mask + noise), shift (1 + noise_bias)
        h.noise.data.fill_(0.1)
        h.noise_bias.data.fill_(-0.2)
        h.perturbed = True
    for name, bn in batch_norms(reference).items():
        bn.weight.data += 0.1 * batch_norms(model)[name].weight.data
        bn.bias.data *= 0.8
    assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_model_unchanged_after_masks_and_on_failure():
    model, _ = tiny_source(epochs=1)
    model.blocks.block1.requires_grad_(False)  # a frozen block stays frozen
    model.zero_grad(set_to_none=True)
    model.train()
    model.blocks.block1[1].eval()  # and its BatchNorm in eval mode
    state, flags = _state(model), [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    clean = clean_subset(load_task("synthetic-0to4"), 0.2, 0)
    masks = neuron_masks(model, clean, ANPConfig(iterations=3, batch_size=8))
    assert set(masks) == set(batch_norms(model))
    assert all(((m >= 0) & (m <= 1)).all() for m in masks.values())
    again = neuron_masks(model, clean, ANPConfig(iterations=3, batch_size=8))  # seeded
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    assert any((m < 1).any() for m in masks.values())  # the masks did move
    bad = ImageSet(clean.x, clean.y + 10)  # labels out of range: fails inside the loop
    with pytest.raises((IndexError, RuntimeError)):
        neuron_masks(model, bad, ANPConfig(iterations=3, batch_size=8))
    assert _same(model, state) and [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not bn._forward_hooks for bn in batch_norms(model).values())
    assert all(p.grad is None for p in model.parameters())


def test_pruning_by_threshold_by_hand():
    model, _ = tiny_source(epochs=1)
    norms = batch_norms(model)
    before = {n: bn.weight.detach().clone() for n, bn in norms.items()}
    biases = {n: bn.bias.detach().clone() for n, bn in norms.items()}
    masks = {n: torch.ones(bn.num_features) for n, bn in norms.items()}
    masks["blocks.block3.1"][[5, 9, 40]] = torch.tensor([0.1, 0.2, 0.21])
    masks["blocks.block1.1"][0] = 0.0
    pruned = prune_by_threshold(model, masks, 0.2)
    assert pruned["blocks.block3.1"].tolist() == [5, 9]
    assert pruned["blocks.block1.1"].tolist() == [0]
    for n, bn in norms.items():
        gone = torch.zeros(bn.num_features, dtype=torch.bool)
        gone[pruned[n]] = True
        assert (bn.weight[gone] == 0).all() and torch.equal(bn.weight[~gone], before[n][~gone])
        assert torch.equal(bn.bias, biases[n])  # their pruning zeroes the scale only
    out = model.eval().forward_to(load_task("synthetic-0to4").test.x[:8], "block3")
    assert torch.allclose(out[:, [5, 9]], biases["blocks.block3.1"][[5, 9]].relu()[None, :, None,
                                                                                   None]
                          .expand(8, 2, *out.shape[2:]))


def test_cli_input_errors(cli, source_dir, tmp_path):
    out = tmp_path / "def"
    for option, value in (("--anp-threshold", "1.5"), ("--anp-iterations", "0")):
        code, _, err = cli("backdoor-defend", source_dir, "--defense", "anp", option, value,
                           "--out", out)
        assert code == 2 and "ANP" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_digits_goal_badnets():
    """10% BadNets on digits 0-4; ANP with 10% clean data, 500 iterations of 32, threshold
    0.5 (their eps 0.4, alpha 0.2, mask lr 0.2)."""
    backdoor = BackdoorConfig("badnets", rate=0.1, target=0)
    model, card = train_backdoor_source(SourceConfig(
        task="digits-0to4", backdoor=backdoor, train=TrainConfig(epochs=30, lr=0.1, seed=0)))
    assert card.metrics["asr"] > 0.95
    task = load_task("digits-0to4")
    cfg = DefenseConfig(anp=ANPConfig(iterations=500, batch_size=32, threshold=0.5))
    state = _state(model)
    defended, info = defend(model, "anp", task, backdoor, cfg)
    assert _same(model, state) and info["pruned_neurons"] > 0
    m = backdoor_metrics(defended, task.test.x, task.test.y, backdoor.trigger(task.input_shape), 0)
    assert m["asr"] < 0.10
    assert m["clean_accuracy"] >= card.metrics["clean_accuracy"] - 0.03
