"""Adversarial-training variants (fgsm, fast, free, trades): each trains and stays in the threat
model; free with m = 1 is FGSM training with a warm perturbation; TRADES with beta = 0 is
natural training; catastrophic overfitting is detected (and rolled back) on a deliberately
overfit FGSM run and not on PGD-AT; wall time per epoch is recorded; bad input is one line."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from robust_transfer.attacks import KLPGD
from robust_transfer.cli import main
from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, SourceCard, build_model
from robust_transfer.train import (
    ExampleLoss,
    PGDExamples,
    SourceConfig,
    TrainConfig,
    fit,
    natural_loss,
    train_source,
)
from robust_transfer.train.methods import FreeLoss, TRADESLoss, make_objective
from robust_transfer.train.overfit import (
    CatastrophicOverfittingWarning,
    OverfitMonitor,
    hold_out,
)

TASK = "synthetic-0to4"
ROBUST = ("pgd", "fgsm", "fast", "free", "trades")


def _model(task=TASK, seed=0):
    t = load_task(task)
    return build_model(ModelSpec("cnn-small", t.num_classes, 1, (0.5,), (0.5,)), seed=seed)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_every_example_a_method_feeds_the_model_is_in_the_ball_and_the_box(norm, eps):
    data = load_task(TASK).train
    x, y = data.x[:32], data.y[:32]
    for method in ROBUST:
        model = _model()
        seen = []
        model.register_forward_pre_hook(lambda _m, args, s=seen: s.append(args[0].detach()))
        objective = make_objective(method, eps, norm, steps=3, free_replays=2)
        for _ in range(3):  # free: the warm perturbation moves between calls
            loss = objective(model, x, y)
            model.zero_grad()
            loss.backward()
        assert len(seen) >= 3
        for inputs in seen:
            dist = (inputs - x).flatten(1).norm(p=float("inf") if norm == "linf" else 2, dim=1)
            assert dist.max() <= eps + 1e-5, method
            assert inputs.min() >= 0 and inputs.max() <= 1, method
        moved = max(float((s - x).abs().max()) for s in seen)
        assert moved > eps / 4, f"{method} never perturbed its inputs"


@pytest.mark.parametrize("method", ["natural", *ROBUST])
def test_each_method_trains_and_records_wall_time_per_epoch(method):
    eps = 0.0 if method == "natural" else 0.1
    extra = {"free_replays": 2} if method == "free" else {}
    cfg = SourceConfig(task=TASK, eps=eps, norm="linf", method=method, attack_steps=2,
                       train=TrainConfig(epochs=2, batch_size=64), **extra)
    model, card = train_source(cfg)
    m = card.metrics
    assert card.method == method and card.recipe["method"] == method
    sweeps = 1 if method == "free" else 2  # free: 2 passes = one sweep of m = 2 replays
    assert len(m["epoch_seconds"]) == sweeps and all(s > 0 for s in m["epoch_seconds"])
    assert m["history"][-1]["passes"] == 2
    assert m["train_seconds"] == pytest.approx(sum(m["epoch_seconds"]))
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"] or sweeps == 1
    assert m["clean_accuracy"] > 0.4  # five classes: it learned something
    assert ("overfit" in m) == (method == "fast")  # fast is watched by default


def test_free_follows_shafahis_code_over_one_sweep():
    data = load_task(TASK).train
    eps, m = 0.1, 2
    cfg = TrainConfig(epochs=m, batch_size=64, schedule="constant", seed=3)  # one sweep
    model = _model()
    fit(model, data, cfg, FreeLoss(eps, "linf", replays=m))

    # Independent replica of free_train.py (Shafahi et al.): the global noise is clipped to
    # [-eps, eps] only, the input clamped to [0,1] in the forward pass, the noise stepped by
    # eps * sign of its own gradient (through the clamp: zero on saturated pixels).
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    noise = torch.zeros_like(data.x[: cfg.batch_size])
    ref.train()
    order = torch.randperm(len(data), generator=shuffle)
    stuck = 0
    for i in range(0, len(order), cfg.batch_size):
        x, y = data.x[order[i:i + cfg.batch_size]], data.y[order[i:i + cfg.batch_size]]
        for _ in range(m):
            batch_noise = noise[: len(x)].clone().requires_grad_(True)
            inputs = (x + batch_noise).clamp(0, 1)
            loss = F.cross_entropy(ref(inputs), y)
            opt.zero_grad()
            loss.backward()
            noise[: len(x)] += eps * batch_noise.grad.sign()
            noise.clamp_(-eps, eps)
            opt.step()
            stuck += int(((x + batch_noise.detach() < 0) & (batch_noise.grad == 0)).sum())
    assert stuck > 0  # saturated pixels whose noise stayed put (the clip-to-box version moves)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(model.state_dict()["head.weight"], _model().state_dict()["head.weight"])


def test_free_epochs_count_passes_over_the_data():
    data = load_task(TASK).train
    history = fit(_model(), data, TrainConfig(epochs=5, batch_size=64),
                  FreeLoss(0.1, "linf", replays=2))
    assert [r["passes"] for r in history] == [2, 4, 6]  # ceil(5 / 2) sweeps of 2 replays


def test_trades_with_beta_zero_is_natural_training_and_beta_weights_the_kl():
    data = load_task(TASK).train
    cfg = TrainConfig(epochs=2, batch_size=64, seed=1)
    trades, natural = _model(), _model()
    fit(trades, data, cfg, TRADESLoss(0.1, "linf", beta=0.0))
    fit(natural, data, cfg, natural_loss)
    for a, b in zip(trades.state_dict().values(), natural.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # beta > 0 with the former uniform start (attack="uniform"): CE(f(x), y) + beta *
    # KL(f(x) || f(x')), batchmean, x' from KLPGD's uniform start with step 2.5 eps / K.
    model, x, y = _model(), data.x[:16], data.y[:16]
    fresh = copy.deepcopy(model)  # train-mode forwards move BatchNorm's running statistics
    loss = TRADESLoss(0.1, "linf", beta=2.0, steps=3, seed=5, attack="uniform")(model, x, y)
    model = fresh
    x_adv = KLPGD(model, 0.1, None, 3, "linf", seed=5 * 2**32, start="uniform")(x, y)
    p, q = F.softmax(model(x), 1), F.softmax(model(x_adv), 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    expected = F.cross_entropy(model(x), y) + 2.0 * kl
    assert kl > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_catastrophic_overfitting_rule_warns_stops_and_rolls_back(monkeypatch):
    """The monitor's rule and actions inside the real loop, on scripted held-out accuracies
    (real FGSM-training trajectories are chaotic: the collapse epoch differs between CPUs).
    Epoch 4 collapses (PGD 0.60 -> 0.10, FGSM 0.60 -> 0.90); epoch 2's dip is no collapse
    (FGSM falls too)."""
    pgd = iter([0.50, 0.20, 0.60, 0.10, 0.10])
    fgsm = iter([0.50, 0.40, 0.60, 0.90, 0.95])
    monkeypatch.setattr(OverfitMonitor, "_accuracy",
                        lambda self, model, attack: next(pgd if attack(model, 0.1).__class__
                                                         .__name__ == "PGD" else fgsm))
    task = load_task("digits-0to4")
    train, held = hold_out(task.train, seed=0)
    model = _model("digits-0to4")
    monitor = OverfitMonitor(held.x, held.y, 0.1, "linf", action="rollback")
    weights = {}

    def snapshot(m, epoch):
        weights[epoch] = copy.deepcopy(m.state_dict())
        return {}

    cfg = TrainConfig(epochs=10, lr=0.1, schedule="constant", batch_size=64)
    with pytest.warns(CatastrophicOverfittingWarning, match="catastrophic overfitting at "
                      "epoch 4"):
        history = fit(model, train, cfg, natural_loss, snapshot, monitor)
    assert [r["catastrophic_overfit"] for r in history] == [False, False, False, True]
    assert monitor.last_good_epoch == 3 and monitor.rolled_back
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[3][key]), key
    assert not torch.equal(weights[3]["head.weight"], weights[4]["head.weight"])
    assert len(train) + len(held) == len(task.train)  # the watched batch is not trained on
    assert not (torch.cdist(held.x.flatten(1), train.x.flatten(1)) == 0).any()


def test_overfit_fgsm_training_masks_the_single_step_attack():
    # Deliberately overfit: FGSM from x itself (no random start) at a large L2 radius, with a
    # constant LR. The monitor's records show the phenomenon it watches for: the model ends
    # far more accurate against FGSM than against PGD (Wong et al. 2020, Sec. 5).
    task = load_task("digits-0to4")
    train, held = hold_out(task.train, seed=0)
    model = _model("digits-0to4")
    monitor = OverfitMonitor(held.x, held.y, 1.5, "l2", action="off")
    objective = ExampleLoss(PGDExamples(1.5, "l2", 1, 1.5, 0, random_start=False))
    cfg = TrainConfig(epochs=20, lr=0.1, schedule="constant", batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatastrophicOverfittingWarning)
        history = fit(model, train, cfg, objective, monitor=monitor)
    last = history[-1]
    assert last["monitor_fgsm_accuracy"] > last["monitor_pgd_accuracy"] + 0.3


def test_overfit_watch_stays_silent_on_pgd_at():
    cfg = SourceConfig(task="digits-0to4", eps=0.5, norm="l2", method="pgd", attack_steps=3,
                       on_overfit="stop", train=TrainConfig(epochs=4, batch_size=64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatastrophicOverfittingWarning)
        _, card = train_source(cfg)
    history = card.metrics["history"]
    assert len(history) == 4 and not any(r["catastrophic_overfit"] for r in history)
    assert history[-1]["monitor_pgd_accuracy"] > 0.5
    assert card.metrics["overfit"]["last_good_epoch"] == 4


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "bogus", "eps": 0.1}, "unknown training method"),
    ({"method": "natural", "eps": 0.1}, "takes eps 0"),
    ({"method": "fast", "eps": 0.0}, "needs eps > 0"),
    ({"method": "trades", "eps": 0.1, "trades_beta": -1.0}, "beta must be >= 0"),
    ({"method": "free", "eps": 0.1, "free_replays": 0}, "replays must be"),
    ({"method": "pgd", "eps": 0.1, "trades_beta": 1.0}, "applies to method 'trades'"),
    ({"eps": 0.0, "on_overfit": "warn"}, "nothing to watch"),
    ({"method": "fast", "eps": 0.1, "on_overfit": "maybe"}, "unknown on-overfit"),
])
def test_bad_method_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        SourceConfig(**kwargs)


def test_defaults_keep_old_recipes():
    assert SourceConfig().method == "natural" and SourceConfig(eps=0.5).method == "pgd"
    assert SourceConfig(eps=0.5).on_overfit == "off"
    fast = SourceConfig(eps=0.5, method="fast")
    assert fast.on_overfit == "warn" and fast.trades_beta is None
    assert SourceConfig(eps=0.5, method="trades").trades_beta == 6.0


@pytest.mark.parametrize("args", [
    ["--method", "trades", "--eps", "0.1", "--trades-beta", "-2"],
    ["--method", "free", "--eps", "0.1", "--free-replays", "0"],
    ["--method", "sgd"],
    ["--method", "gaussian", "--sigma", "0"],
    ["--method", "gaussian", "--sigma", "-0.5"],
    ["--method", "smoothadv", "--eps", "0.5", "--noise-samples", "0"],
])
def test_cli_bad_method_input_is_one_line_exit_2(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "o"), "--epochs", "1", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- grid and report

def test_spec_sources_carry_the_method_and_its_options():
    from robust_transfer.transfer.spec import expand, parse_spec
    from test_study_seams import SPEC_DICT

    sources = [{"eps": 0.0}, {"eps": 0.5}, {"eps": 0.5, "method": "fast"},
               {"eps": 0.5, "method": "trades", "trades_beta": 3},
               {"eps": 0.5, "method": "free", "free_replays": 2, "on_overfit": "warn"}]
    runs = expand(parse_spec({**SPEC_DICT, "sources": sources, "seeds": [0]}))
    configs = {r.source_id: r.source for r in runs}
    assert [c.method for c in configs.values()] == ["natural", "pgd", "fast", "trades", "free"]
    trades = next(c for c in configs.values() if c.method == "trades")
    free = next(c for c in configs.values() if c.method == "free")
    assert trades.trades_beta == 3.0 and free.free_replays == 2 and free.on_overfit == "warn"
    assert any(i.startswith("fast-l2-eps0.5-") for i in configs)
    with pytest.raises(UserError, match="twice"):  # the default method named is the same source
        parse_spec({**SPEC_DICT, "sources": [{"eps": 0.5}, {"eps": 0.5, "method": "pgd"}]})
    with pytest.raises(UserError, match="needs eps > 0"):
        parse_spec({**SPEC_DICT, "sources": [{"eps": 0.0, "method": "trades"}]})


def test_method_is_treatment_not_recipe_and_the_report_never_pools_methods():
    from robust_transfer.report.study import paired_delta, prepare, summary_markdown
    from robust_transfer.transfer.run import source_columns
    from test_study_seams import GAIN, results_table

    card = SourceCard(model=ModelSpec(), task=TASK, seed=0)
    recipes = {m: SourceConfig(task=TASK, eps=0.5 if m != "natural" else 0.0, method=m)
               for m in ("natural", "pgd", "fast", "trades")}
    cols = {m: source_columns(replace(card, recipe=c.to_dict(), method=c.method, eps=c.eps,
                                      norm=c.norm)) for m, c in recipes.items()}
    assert len({c["source_recipe"] for c in cols.values()}) == 1  # one comparison group
    assert [c["source_method"] for c in cols.values()] == list(recipes)
    old = source_columns(replace(card, eps=0.5, norm="l2"))  # a checkpoint from before
    assert old["source_method"] == "pgd"

    table = results_table(recipes=("rA",))
    fast = table[table.source_eps > 0].assign(source_method="fast",
                                              test_accuracy=lambda d: d.test_accuracy + 0.03)
    both = pd.concat([table.assign(source_method=lambda d: d.source_eps.map(
        lambda e: "natural" if e == 0 else "pgd")), fast])
    df = prepare(both)
    assert set(df.source) == {"natural", "L2 ε=0.5", "FAST L2 ε=0.5"}
    delta = paired_delta(df)
    np.testing.assert_allclose(delta[delta.source == "L2 ε=0.5"].delta, GAIN["rA"], atol=1e-9)
    np.testing.assert_allclose(delta[delta.source == "FAST L2 ε=0.5"].delta, GAIN["rA"] + 0.03,
                               atol=1e-9)
    header = next(line for line in summary_markdown(df).splitlines()
                  if line.startswith("| unfrozen"))
    assert "| natural | L2 ε=0.5 | FAST L2 ε=0.5 |" in header
    assert set(prepare(table).source) == {"natural", "L2 ε=0.5"}  # no method column: as before
