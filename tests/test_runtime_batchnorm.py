"""`models.runtime.input_gradients_only`: attacks' BatchNorm backward without the weight
gradients, bit-identical to PyTorch's own."""

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_transfer.attacks.base as attack_base
from robust_transfer.attacks import APGD, PGD
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.models.runtime import input_gradients_only


def _trained_bn_model(arch: str) -> nn.Module:
    size = 8 if arch.startswith("cnn") else 16
    model = build_model(ModelSpec(arch, 5, 3, (0.5,) * 3, (0.25,) * 3), seed=0)
    with torch.no_grad():
        model.train()(torch.rand(32, 3, size, size))  # running stats away from 0 / 1
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 2.0)
                bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _logits_and_input_grad(model, x, y):
    xr = x.clone().requires_grad_(True)
    logits = model(xr)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr)
    return logits.detach(), grad


@pytest.mark.parametrize("arch", ["cnn-small", "resnet18"])
def test_outputs_and_input_gradients_are_bit_identical_and_forwards_restored(arch):
    model = _trained_bn_model(arch)
    size = 8 if arch.startswith("cnn") else 16
    x, y = torch.rand(12, 3, size, size), torch.arange(12) % 5
    ref = _logits_and_input_grad(model, x, y)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with input_gradients_only(model):
        assert all("forward" in vars(bn) for bn in bns)
        got = _logits_and_input_grad(model, x, y)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert not any("forward" in vars(bn) for bn in bns)


@pytest.mark.parametrize("shape", [(10, 6), (10, 6, 7)])
def test_batchnorm1d_on_features_and_sequences(shape):
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.train()(torch.randn(*shape) * 3 + 1)
        bn.weight.uniform_(0.5, 2.0)
    bn.eval()
    x, g = torch.randn(*shape), torch.randn(*shape)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(bn(xr), xr, g)
    with input_gradients_only(bn):
        (got,) = torch.autograd.grad(bn(xr), xr, g)
    assert torch.equal(ref, got)


def test_weight_gradients_stop_inside_and_training_layers_are_untouched():
    model = _trained_bn_model("cnn-small")
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 5
    with input_gradients_only(model):
        F.cross_entropy(model(x), y).backward()
    assert bn.weight.grad is None  # documented: input gradients only
    F.cross_entropy(model(x), y).backward()
    assert bn.weight.grad is not None  # restored: the native layer again

    # a layer in training mode inside the context runs natively: same batch statistics,
    # same running-stat update, same gradients
    twin = copy.deepcopy(model)
    model.train(), twin.train()
    with input_gradients_only(model):
        a = _logits_and_input_grad(model, x, y)
    b = _logits_and_input_grad(twin, x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(bn.running_mean,
                       next(m for m in twin.modules() if isinstance(m, nn.BatchNorm2d))
                       .running_mean)


def test_nesting_keeps_the_outer_patch_until_the_outer_exit():
    model = _trained_bn_model("cnn-small")
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with input_gradients_only(model):
        with input_gradients_only(model):
            pass
        assert "forward" in vars(bn)
    assert "forward" not in vars(bn)


@pytest.mark.parametrize("make", [lambda m: PGD(m, 0.1, steps=5, seed=0),
                                  lambda m: APGD(m, 0.1, steps=10, seed=0)])
def test_attacks_give_the_same_examples_as_with_the_native_layers(make, monkeypatch):
    model = _trained_bn_model("cnn-small")
    x, y = torch.rand(16, 3, 8, 8), torch.arange(16) % 5
    fast = make(model)(x, y)
    monkeypatch.setattr(attack_base, "input_gradients_only", lambda m: nullcontext())
    native = make(model)(x, y)
    assert torch.equal(fast, native)


def test_a_batchnorm_subclass_with_its_own_forward_is_left_alone():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(1, 4, 3), Scaled(4)).eval()
    x = torch.rand(3, 1, 6, 6, requires_grad=True)
    with input_gradients_only(model):
        assert "forward" not in vars(model[1])
        (got,) = torch.autograd.grad(model(x).sum(), x)
    (want,) = torch.autograd.grad(model(x).sum(), x)
    assert torch.equal(got, want)
