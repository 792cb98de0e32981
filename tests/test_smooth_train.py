"""Training for randomized smoothing: `gaussian` (Cohen et al. 2019) adds unclipped noise of
std sigma from a seeded generator; `smoothadv` (Salman et al. 2019) attacks the smoothed soft
classifier inside the L2 ball and trains on the m noisy copies, equal to an independent
replica; both are grid-source treatments paired with the natural source; fine-tuning takes
`noise_sigma`; old ids do not move; bad input is one line, exit 2."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from robust_transfer.data import load_task
from robust_transfer.data.augment import NOISE_SALT, GaussianNoise
from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, SourceCard, build_model
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
    _, card = train_source(cfg)
    m = card.metrics
    assert 0 <= m["noise_accuracy"] <= 1 and m["clean_accuracy"] > 0.2
    assert card.recipe["sigma"] == 0.25 and card.method == "smoothadv"


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
    ({"method": "gaussian", "norm": "linf"}, "L2 norm"),
    ({"method": "smoothadv", "eps": 0.5, "noise_samples": 0}, "noise samples must be"),
    ({"method": "pgd", "eps": 0.5, "sigma": 0.25}, "applies to method 'gaussian' and"),
    ({"method": "gaussian", "noise_samples": 2}, "applies to method 'smoothadv'"),
    ({"method": "gaussian", "on_overfit": "warn"}, "nothing to watch"),
])
def test_bad_smoothing_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        SourceConfig(**kwargs)


# ---------------------------------------------------------------- grid, fine-tuning, report

DEMO_RUN_IDS = "ec882d255dbc0d85"  # sha256 of the demo spec's run ids, before smoothing existed
DEMO_SOURCES = ["l2-eps0-73083e10", "l2-eps0.5-02d63024", "l2-eps1-064271ff"]
DEMO_SPEC_TEXT = "8be62e415da3c3cc"

SMOOTH_SPEC = {
    "source": {"task": TASK, "epochs": 2, "attack_steps": 2},
    "sources": [{"eps": 0.0}, {"method": "gaussian", "sigma": 0.25},
                {"method": "smoothadv", "eps": 0.5, "sigma": 0.25, "noise_samples": 2}],
    "targets": ["synthetic-5to9"], "images_per_class": [2], "unfrozen_blocks": [0],
    "epochs": 2, "seeds": [0, 1], "noise_sigma": [0, 0.25],
}


def test_old_specs_keep_their_run_ids_source_ids_and_recorded_text():
    import hashlib

    from robust_transfer.transfer.grid import demo_spec_path, spec_text
    from robust_transfer.transfer.spec import expand, load_spec

    spec = load_spec(demo_spec_path())
    runs = expand(spec)
    digest = hashlib.sha256(" ".join(r.run_id for r in runs).encode()).hexdigest()[:16]
    assert digest == DEMO_RUN_IDS and len(runs) == 216
    assert sorted({r.source_id for r in runs}) == DEMO_SOURCES
    assert hashlib.sha256(spec_text(spec).encode()).hexdigest()[:16] == DEMO_SPEC_TEXT
    assert all("noise_sigma" not in r.finetune.to_dict() for r in runs)


def test_smoothing_sources_parse_into_treatments_and_noise_is_a_finetune_variable():
    from robust_transfer.transfer.grid import spec_text
    from robust_transfer.transfer.run import source_columns
    from robust_transfer.transfer.spec import expand, parse_spec

    spec = parse_spec(SMOOTH_SPEC)
    runs = expand(spec)
    assert len(runs) == 3 * 2 * 2  # sources x noise_sigma x seeds
    sources = {r.source_id: r.source for r in runs}
    ids = sorted(sources)
    assert ids[0].startswith("gaussian-l2-eps0-sigma0.25-")
    assert ids[1].startswith("l2-eps0-")  # the natural source is kept beside gaussian
    assert ids[2].startswith("smoothadv-l2-eps0.5-sigma0.25-")
    smoothadv = sources[ids[2]]
    assert smoothadv.noise_samples == 2 and smoothadv.attack_steps == 2
    assert {r.finetune.noise_sigma for r in runs} == {0.0, 0.25}
    assert "noise_sigma:\n- 0.0\n- 0.25\n" in spec_text(spec)
    # one comparison group: the same recipe but for the treatment
    card = SourceCard(model=ModelSpec(), task=TASK, seed=0)
    cols = [source_columns(replace(card, recipe=c.to_dict(), method=c.method, eps=c.eps,
                                   norm=c.norm)) for c in sources.values()]
    assert len({c["source_recipe"] for c in cols}) == 1
    assert sorted(c["source_sigma"] for c in cols) == [0.0, 0.25, 0.25]
    with pytest.raises(UserError, match="sigma must be > 0"):
        parse_spec({**SMOOTH_SPEC, "sources": [{"method": "gaussian", "sigma": 0}]})
    with pytest.raises(UserError, match="noise sigma must be >= 0"):
        parse_spec({**SMOOTH_SPEC, "noise_sigma": [-0.1]})
    with pytest.raises(UserError, match="applies to method"):
        parse_spec({**SMOOTH_SPEC, "sources": [{"eps": 0.5, "sigma": 0.25}]})


def test_batched_engine_covers_smoothing_sources_but_not_noisy_fine_tunes(source_dir):
    from robust_transfer.models import load_checkpoint
    from robust_transfer.transfer import FinetuneConfig
    from robust_transfer.transfer.batched import applies

    model, card = load_checkpoint(source_dir)
    cfg = SourceConfig(task=TASK, method="smoothadv", eps=0.5, noise_samples=2)
    smooth_card = replace(card, recipe=cfg.to_dict(), method="smoothadv", eps=0.5)
    plain = FinetuneConfig("synthetic-5to9", 2)
    assert applies(model, plain, smooth_card)
    assert not applies(model, FinetuneConfig("synthetic-5to9", 2, noise_sigma=0.25), card)


def test_finetune_noise_sigma_through_the_cli(source_dir, tmp_path, cli):
    from robust_transfer.models import read_card
    from robust_transfer.transfer import FinetuneConfig
    from robust_transfer.transfer.run import finetune_from_checkpoint

    code, out, err = cli("finetune", source_dir, "--task", "synthetic-5to9", "--epochs", "2",
                         "--images-per-class", "3", "--noise-sigma", "0.5", "--out",
                         tmp_path / "ft")
    assert code == 0, err
    card = read_card(tmp_path / "ft")
    assert card.finetune["noise_sigma"] == 0.5
    noisy = FinetuneConfig("synthetic-5to9", 3, epochs=2, noise_sigma=0.5)
    rows = finetune_from_checkpoint(source_dir, noisy)
    assert rows[-1]["test_accuracy"] == card.metrics["test_accuracy"]  # seeded: the same
    assert rows[-1]["noise_sigma"] == 0.5
    plain = finetune_from_checkpoint(source_dir, FinetuneConfig("synthetic-5to9", 3, epochs=2))
    assert plain[-1]["noise_sigma"] == 0.0 and plain[-1]["train_loss"] != rows[-1]["train_loss"]
    assert "noise_sigma" not in FinetuneConfig("synthetic-5to9", 3).to_dict()
    code, _, err = cli("finetune", source_dir, "--noise-sigma", "-1", "--out", tmp_path / "bad")
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0
    assert "noise sigma" in err and not (tmp_path / "bad").exists()


def test_grid_with_smoothing_sources_and_noise_reports_each_noise_apart(tmp_path):
    from robust_transfer.report.study import make_report, paired_delta, prepare
    from robust_transfer.transfer.grid import run_grid
    from robust_transfer.transfer.results import read_results
    from robust_transfer.transfer.spec import parse_spec

    table = run_grid(parse_spec(SMOOTH_SPEC), tmp_path / "g", workers=1)
    df = prepare(read_results(table))
    assert set(df.source) == {"natural", "GAUSSIAN σ=0.25", "SMOOTHADV L2 ε=0.5 σ=0.25"}
    assert set(df.noise_sigma) == {0.0, 0.25}
    delta = paired_delta(df)  # each treated run pairs with the natural run of its noise
    assert len(delta) == len(df[df.source != "natural"])
    for _, row in delta.iterrows():
        natural = df[(df.source == "natural") & (df.seed == row.seed) & (df.epoch == row.epoch)
                     & (df.noise_sigma == row.noise_sigma)]
        assert row.test_accuracy_natural == natural.test_accuracy.item()
    by_noise = df.set_index(["source", "seed", "epoch", "noise_sigma"]).train_loss.unstack()
    assert (by_noise[0.0] != by_noise[0.25]).all()  # the noise reached every noisy fine-tune
    report = make_report(table, tmp_path / "report")
    summary = report.summary.read_text()
    assert summary.count("## ") == 2 and "fine-tuned with noise σ=0.25" in summary
    assert "| natural | GAUSSIAN σ=0.25 | SMOOTHADV L2 ε=0.5 σ=0.25 |" in summary
    names = sorted(p.name for p in report.figures)
    assert any(n.endswith("_noise0.25.png") for n in names)
    assert any(n.endswith("_noise0.png") for n in names)
