"""Training for randomized smoothing: `gaussian` (Cohen et al. 2019) adds unclipped noise of
std sigma from a seeded generator; `smoothadv` (Salman et al. 2019) attacks the smoothed soft
classifier inside the L2 ball and trains on the m noisy copies, equal to an independent
replica; both are grid-source treatments paired with the natural source; fine-tuning takes
`noise_sigma`; old ids do not move; bad input is one line, exit 2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robust_transfer.cli import main
from robust_transfer.data import load_task
from robust_transfer.data.augment import NOISE_SALT, GaussianNoise
from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.train import SourceConfig, TrainConfig, fit, train_source
from robust_transfer.train.methods import make_objective
from robust_transfer.train.smoothing import SmoothAdvLoss, smoothed_cross_entropy

TASK = "synthetic-0to4"


def _model(seed=0):
    t = load_task(TASK)
    return build_model(ModelSpec("cnn-small", t.num_classes, 1, (0.5,), (0.5,)), seed=seed)


def _batch(n=32):
    data = load_task(TASK).train
    return data.x[:n], data.y[:n]


# ---------------------------------------------------------------- gaussian


def test_gaussian_objective_feeds_x_plus_unclipped_noise_of_std_sigma():
    x, y = _batch(64)
    model = _model()
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    loss = make_objective("gaussian", 0.0, "l2", sigma=0.5, seed=3)(model, x, y)
    # independent computation: the generator GaussianNoise documents, drawn by hand
    g = torch.Generator().manual_seed(3 + NOISE_SALT)
    expected = x + 0.5 * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(loss, F.cross_entropy(model(expected), y))
    noise, n = seen[0] - x, x.numel()  # 4096 draws: 4 standard errors
    assert abs(noise.std().item() - 0.5) < 4 * 0.5 / math.sqrt(2 * n)
    assert abs(noise.mean().item()) < 4 * 0.5 / math.sqrt(n)
    assert seen[0].min() < 0 and seen[0].max() > 1  # not clipped to [0,1]


def test_noise_is_fresh_per_call_and_reproducible_per_seed():
    x = torch.rand(8, 1, 8, 8)
    a, b = GaussianNoise(0.25, seed=1), GaussianNoise(0.25, seed=1)
    first, second = a(x), a(x)
    assert not torch.equal(first, second)  # a new draw each batch
    assert torch.equal(first, b(x)) and torch.equal(second, b(x))
    assert not torch.equal(first, GaussianNoise(0.25, seed=2)(x))


def test_same_seed_same_weights():
    data = load_task(TASK).train
    weights = []
    for _ in range(2):
        model = _model()
        fit(model, data, TrainConfig(epochs=1, seed=0), make_objective("gaussian", 0.0, "l2",
                                                                        sigma=0.25, seed=0))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


# ---------------------------------------------------------------- smoothadv


def _replica_smoothadv(model, x, y, noise, eps, steps):
    """SmoothAdv-PGD written out independently: -log mean softmax over the noise copies,
    normalised-gradient L2 steps of 2*eps/steps from x, projection by rescaling onto the
    ball, clip to [0,1]; then mean CE over the m noisy copies, forwarded as one batch in
    train mode (as train_pgd.py --train-multi-noise does)."""
    m = noise.shape[0]
    alpha = 2 * eps / steps
    model.eval()
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        probs = torch.stack([F.softmax(model(x_adv + noise[i]), 1) for i in range(m)]).mean(0)
        loss = -torch.log(probs[torch.arange(len(y)), y]).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            g_norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            step = x_adv + alpha * grad / (g_norm + 1e-12)
            delta = step - x
            d_norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(eps / d_norm, max=1.0)
            x_adv = (x + delta).clamp(0, 1)
    model.train()  # one train-mode batch of all m copies (BatchNorm sees them together)
    logits = model(torch.cat([x_adv + noise[i] for i in range(m)]))
    return x_adv, F.cross_entropy(logits, torch.cat([y] * m))


@pytest.mark.parametrize("m", [1, 3])
def test_smoothadv_point_in_the_ball_and_loss_equals_an_independent_replica(m):
    x, y = _batch(16)
    eps, sigma, steps = 0.5, 0.25, 4
    model = _model()
    model.train()
    seen = []
    loss_fn = SmoothAdvLoss(eps, sigma, steps, samples=m, seed=5)
    original = loss_fn.adversarial
    loss_fn.adversarial = lambda *a: seen.append(original(*a)) or seen[-1]
    loss = loss_fn(model, x, y)
    x_adv = seen[0]
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).flatten(1).norm(dim=1).min() > 0.4 * eps  # it did move
    g = torch.Generator().manual_seed(5 + NOISE_SALT)
    noise = sigma * torch.randn((m, *x.shape), generator=g)
    # the same initial weights and BN statistics (the loss's train-mode pass moved `model`'s)
    replica_x, replica_loss = _replica_smoothadv(_model().train(), x, y, noise, eps, steps)
    torch.testing.assert_close(x_adv, replica_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, replica_loss, atol=1e-5, rtol=1e-5)
    assert model.training  # the attack restored train mode


def test_smoothed_cross_entropy_is_minus_log_of_the_mean_softmax():
    x, y = _batch(8)
    model = _model().eval()
    noise = 0.3 * torch.randn(5, *x.shape, generator=torch.Generator().manual_seed(0))
    got = smoothed_cross_entropy(model, x, y, noise)
    probs = torch.stack([F.softmax(model(x + n), 1) for n in noise]).mean(0)
    torch.testing.assert_close(got, -torch.log(probs[torch.arange(8), y]))
    # one draw: plain cross-entropy on the noisy input
    torch.testing.assert_close(smoothed_cross_entropy(model, x, y, noise[:1]),
                               F.cross_entropy(model(x + noise[0]), y, reduction="none"))


def test_smoothadv_source_trains_and_records_noise_accuracy():
    cfg = SourceConfig(task=TASK, eps=0.5, method="smoothadv", attack_steps=2,
                       train=TrainConfig(epochs=1))
    assert cfg.sigma == 0.25 and cfg.noise_samples == 1 and cfg.norm == "l2"
    _, meta = train_source(cfg)
    m = meta["metrics"]
    assert 0 <= m["noise_accuracy"] <= 1 and m["clean_accuracy"] > 0.2
    assert meta["recipe"]["sigma"] == 0.25 and meta["method"] == "smoothadv"


# ---------------------------------------------------------------- configs and the CLI


def test_recipes_without_noise_keep_their_dicts():
    for cfg in (SourceConfig(), SourceConfig(eps=0.5), SourceConfig(eps=0.5, method="trades")):
        d = cfg.to_dict()
        assert "sigma" not in d and "noise_samples" not in d
    assert SourceConfig(method="gaussian").to_dict()["sigma"] == 0.25
    assert "noise_samples" not in SourceConfig(method="gaussian").to_dict()


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "gaussian", "sigma": 0.0}, "sigma must be > 0"),
    ({"method": "gaussian", "sigma": -0.1}, "sigma must be > 0"),
    ({"method": "gaussian", "sigma": math.inf}, "sigma must be > 0"),
    ({"method": "gaussian", "eps": 0.5}, "takes eps 0"),
    ({"method": "smoothadv", "eps": 0.0}, "needs eps > 0"),
    ({"method": "smoothadv", "eps": 0.5, "norm": "linf"}, "L2 norm"),
    ({"method": "smoothadv", "eps": 0.5, "noise_samples": 0}, "noise samples must be"),
    ({"method": "pgd", "eps": 0.5, "sigma": 0.25}, "applies to method 'gaussian' and"),
    ({"method": "gaussian", "noise_samples": 2}, "applies to method 'smoothadv'"),
    ({"method": "gaussian", "on_overfit": "warn"}, "nothing to watch"),
])
def test_bad_smoothing_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        SourceConfig(**kwargs)


@pytest.mark.parametrize("args", [
    ["--method", "gaussian", "--sigma", "0"],
    ["--method", "gaussian", "--sigma", "-0.5"],
    ["--method", "smoothadv", "--eps", "0.5", "--noise-samples", "0"],
])
def test_cli_bad_sigma_is_one_line_exit_2(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "o"), "--epochs", "1", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()
