"""The calling convention, for every attack: inside its threat model and [0,1], the model's
modes and parameter gradients untouched, batch sizes 1 and many, deterministic given a seed."""

from __future__ import annotations

import copy

import pytest
import torch

from attack_fixtures import digits_batch, fresh, natural_model
from robust_transfer.attacks import (
    APGD,
    APGDT,
    BIM,
    CW,
    FGSM,
    LBFGS,
    PGD,
    DeepFool,
    FoolingImages,
    Square,
    UniversalPerturbation,
    make_attack,
    make_threat,
)
from robust_transfer.attacks.registry import ATTACKS as REGISTRY
from robust_transfer.errors import UserError

EPS = {"linf": 0.1, "l2": 1.0, "l1": 2.0}

# name -> (factory(model), norm of its threat model or None for minimal-norm/unbounded)
ATTACKS = {
    "fgsm": (lambda m: FGSM(m, EPS["linf"]), "linf"),
    "fgsm-l2": (lambda m: FGSM(m, EPS["l2"], norm="l2"), "l2"),
    "bim": (lambda m: BIM(m, EPS["linf"], steps=3), "linf"),
    "pgd-linf": (lambda m: PGD(m, EPS["linf"], steps=3, seed=0), "linf"),
    "pgd-l2-restarts-best": (lambda m: PGD(m, EPS["l2"], steps=3, norm="l2", seed=0,
                                           restarts=2, return_best=True), "l2"),
    "pgd-l1": (lambda m: PGD(m, EPS["l1"], steps=3, norm="l1", seed=0, restarts=2), "l1"),
    "apgd-ce": (lambda m: APGD(m, EPS["linf"], steps=5, seed=0), "linf"),
    "apgd-dlr-l2": (lambda m: APGD(m, EPS["l2"], "l2", steps=5, loss="dlr", seed=0), "l2"),
    "apgd-t": (lambda m: APGDT(m, EPS["linf"], steps=3, n_target_classes=2, seed=0), "linf"),
    "square": (lambda m: Square(m, EPS["linf"], n_queries=20, seed=0), "linf"),
    "cw": (lambda m: CW(m, c=10.0, steps=20, lr=0.1, search_steps=2), None),
    "deepfool": (lambda m: DeepFool(m, steps=3), None),
    "deepfool-linf": (lambda m: DeepFool(m, "linf", steps=3), None),
    "lbfgs": (lambda m: LBFGS(m, search_steps=2, max_iter=5), None),
    "universal": (lambda m: UniversalPerturbation(m, 1.0, max_passes=1, deepfool_steps=3)
                  .fit(digits_batch(16, offset=100)), "l2-universal"),
    "fooling": (lambda m: FoolingImages(m, steps=5), None),
}


def _within(norm, x_adv, x):
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if norm == "l2-universal":  # x + v clipped: each example's change is at most ||v||
        norm = "l2"
    if norm is not None:
        dist = make_threat(norm, EPS[norm]).distance(x_adv, x)
        assert (dist <= EPS[norm] * (1 + 1e-5) + 1e-6).all(), dist.max()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_contract(name):
    factory, norm = ATTACKS[name]
    model = fresh(natural_model())
    model.train()
    model.blocks.block1[1].eval()  # a frozen BatchNorm must stay in eval mode afterwards
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {}
    for n, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        grads[n] = p.grad.clone()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    x, y = digits_batch(9)
    atk = factory(model)
    out = {}
    for bs in (1, 9):
        x_adv = atk(x[:bs], y[:bs])
        assert x_adv.shape == x[:bs].shape and not x_adv.requires_grad
        _within(norm, x_adv, x[:bs])
        out[bs] = x_adv
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():  # BatchNorm statistics untouched
        assert torch.equal(b, buffers[n]), n
    # deterministic given the seed: two fresh attacks give the same examples
    first, again = factory(model)(x, y), factory(model)(x, y)
    torch.testing.assert_close(again, first, atol=1e-6, rtol=0)
    # something actually happened for the attacks that perturb
    assert not torch.equal(out[9], x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", list(ATTACKS))
def test_contract_cuda(name):
    factory, norm = ATTACKS[name]
    model = copy.deepcopy(natural_model()).cuda()
    x, y = digits_batch(9)
    x, y = x.cuda(), y.cuda()
    x_adv = factory(model)(x, y)
    assert x_adv.device.type == "cuda"
    _within(norm, x_adv.cpu(), x.cpu())
    torch.testing.assert_close(factory(model)(x, y), x_adv, atol=1e-5, rtol=0)


# Every registered attack x every norm it declares, built by name as evaluators do.
QUICK_STEPS = {"square": 30, "cw": 20, "lbfgs": 5}
REGISTRY_CASES = [(name, norm) for name, cls in sorted(REGISTRY.items()) for norm in cls.norms]


@pytest.mark.parametrize(("name", "norm"), REGISTRY_CASES)
def test_every_attack_in_every_declared_norm(name, norm):
    # float64: float32 conv kernels are not batch-invariant on every CPU (logits move by ~5e-7
    # with the batch size) and a minimal-norm attack's discrete choices can amplify that; in
    # float64 the forward is batch-invariant, so the check below isolates the attack itself.
    model = fresh(natural_model()).double()
    x, y = digits_batch(12)
    x = x.double()
    atk = make_attack(name, model, EPS[norm], norm, steps=QUICK_STEPS.get(name, 3), seed=0)
    x_adv = atk(x, y)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    if not atk.minimal_norm:  # minimal-norm attacks have no ball; evaluate applies eps
        _within(norm, x_adv, x)
    assert not torch.equal(x_adv, x)
    # batch independence: 4 examples inside the batch equal the same 4 alone
    alone = make_attack(name, model, EPS[norm], norm, steps=QUICK_STEPS.get(name, 3),
                        seed=0)(x[4:8], y[4:8])
    torch.testing.assert_close(alone, x_adv[4:8], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_undeclared_norms_raise_naming_the_supported_ones(name):
    cls = REGISTRY[name]
    for norm in sorted(set(EPS) - set(cls.norms)):
        with pytest.raises(UserError, match=f"does not support norm '{norm}'.*supports: "
                           + ", ".join(cls.norms)):
            make_attack(name, natural_model(), EPS[norm], norm)


class _RowCounter(torch.nn.Module):
    """Wraps a model, recording how many examples each forward pass gets."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, []

    def forward(self, x):
        self.rows.append(len(x))
        return self.net(x)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr-l2", "apgd-t", "square", "fab-t"])
def test_examples_wrong_at_x_are_returned_unchanged_without_queries(name):
    # The reference codes (AutoAttack's APGD, APGD-T, FAB, Square; Andriushchenko et al.'s
    # Square) attack only the examples the model gets right: one already wrong is adversarial
    # at distance 0.
    net = fresh(natural_model())
    model = _RowCounter(net)
    x, y = digits_batch(12)
    y = y.clone()
    pred = net.eval()(x).argmax(1)
    wrong = torch.arange(12) % 3 == 0
    y[wrong] = (pred[wrong] + 1) % 5
    make = ATTACKS[name][0] if name in ATTACKS else (
        lambda m: make_attack("fab-t", m, EPS["linf"], "linf", 5, 0))
    x_adv = make(model)(x, y)
    assert torch.equal(x_adv[wrong], x[wrong])
    right = int((~wrong).sum())
    assert model.rows[0] == len(y) and max(model.rows[1:]) <= right
