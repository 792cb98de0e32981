"""Backdoor defenses and CLI: fine-pruning removes exactly the chosen channels, ABL isolates
mostly poisoned examples on a strongly poisoned task, super-FT's triangular schedule, and the
CLI's input errors (one line, exit 2, nothing written)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_source
from robust_transfer.backdoors.abl import ABLConfig, LGALoss, anti_backdoor_learning
from robust_transfer.backdoors.defenses import (
    DefenseConfig,
    channel_activity,
    choose_pruned,
    clean_subset,
    fine_prune,
    prune_channels,
)
from robust_transfer.cli import main
from robust_transfer.data import load_task
from robust_transfer.data.poison import BackdoorConfig, poison
from robust_transfer.errors import UserError
from robust_transfer.models import ModelSpec, build_model
from robust_transfer.train import TrainConfig, fit


def test_fine_pruning_removes_exactly_the_chosen_channels():
    model, _ = tiny_source(epochs=2)
    task = load_task("synthetic-0to4")
    x = task.test.x[:32]
    before = model.forward_to(x, "block3").detach()
    chosen = torch.tensor([3, 17, 90])
    prune_channels(model, chosen)
    after = model.forward_to(x, "block3").detach()
    kept = torch.ones(before.shape[1], dtype=torch.bool)
    kept[chosen] = False
    assert torch.all(after[:, chosen] == 0) and torch.equal(after[:, kept], before[:, kept])

    model, _ = tiny_source(epochs=2)
    clean = clean_subset(task, 0.3, 0)
    cfg = DefenseConfig(epochs=2, prune_drop=0.05)
    order = torch.argsort(channel_activity(model, clean.x), stable=True)
    pruned = choose_pruned(model, clean, cfg)
    assert len(pruned) > 0 and torch.equal(pruned, order[: len(pruned)].sort().values)
    model, pruned2 = fine_prune(model, clean, cfg)
    assert torch.equal(pruned, pruned2)
    out = model.forward_to(task.test.x, "block3").detach()
    assert torch.all(out[:, pruned] == 0)


def test_fine_pruning_prunes_one_channel_at_a_time_until_accuracy_drops():
    """Liu et al.'s stop rule, recomputed by hand: the largest n (one channel per step) such
    that every prefix up to n keeps clean accuracy within prune_drop of the unpruned model."""
    import copy

    from robust_transfer.models.runtime import accuracy

    model, _ = tiny_source(epochs=2)
    clean = clean_subset(load_task("synthetic-0to4"), 0.3, 0)
    cfg = DefenseConfig(epochs=1, prune_drop=0.02)
    order = torch.argsort(channel_activity(model, clean.x), stable=True)
    limit = accuracy(model, clean.x, clean.y) - cfg.prune_drop
    expected, cap = 0, int(cfg.prune_max * len(order))
    while expected < cap:
        trial = copy.deepcopy(model)
        conv = [m for m in trial.blocks[-1].modules() if isinstance(m, torch.nn.Conv2d)][-1]
        norm = [m for m in trial.blocks[-1].modules()
                if isinstance(m, torch.nn.BatchNorm2d)][-1]
        with torch.no_grad():
            for t in (conv.weight, norm.weight, norm.bias):
                t[order[: expected + 1]] = 0
        if accuracy(trial, clean.x, clean.y) < limit:
            break
        expected += 1
    pruned = choose_pruned(model, clean, cfg)
    assert 0 < len(pruned) == expected < cap
    coarse = choose_pruned(model, clean, DefenseConfig(prune_drop=0.02, prune_step=8))
    assert len(coarse) % 8 == 0 and len(coarse) <= expected
    with pytest.raises(UserError, match="prune step"):
        DefenseConfig(prune_step=0)


def test_abl_isolates_mostly_poisoned_examples():
    task = load_task("synthetic-0to4")
    data, index = poison(task.train, BackdoorConfig(rate=0.3, patch_size=4), 5)
    model = build_model(ModelSpec("cnn-small", 5, 1), seed=0)
    cfg = ABLConfig(isolation_epochs=6, isolate=0.1, rest_epochs=0, unlearn_epochs=1)
    _, isolated = anti_backdoor_learning(model, data, TrainConfig(lr=0.1), cfg)
    assert len(isolated) == 21
    assert torch.isin(isolated, index).float().mean() >= 0.8  # 63 of 210 poisoned: 30% by chance
    loss = LGALoss(0.5)
    assert loss(lambda x: torch.tensor([[9.0, 0.0]]), None, torch.tensor([0])) < 0  # ascends


def test_triangular_schedule_rises_then_falls():
    model, _ = tiny_source(epochs=1)
    history = fit(model, load_task("synthetic-0to4").train.subset(torch.arange(8)),
                  TrainConfig(epochs=5, lr=0.1, schedule="triangular"))
    lrs = [round(r["epoch_lr"], 6) for r in history]
    assert lrs == [0.02, 0.06, 0.1, 0.06, 0.02]


@pytest.mark.parametrize("args, message", [
    (["backdoor", "attack", "--rate", "1.5"], "poison rate"),
    (["backdoor", "attack", "--rate", "0"], "poison rate"),
    (["backdoor", "attack", "--target", "7"], "does not exist"),
    (["backdoor", "attack", "--patch-size", "9"], "does not fit"),
])
def test_attack_input_errors(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(out), "--epochs", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_defend_input_errors(source_dir, tmp_path, capsys):
    out = tmp_path / "def"
    with pytest.raises(SystemExit) as e:
        main(["backdoor-defend", str(source_dir), "--defense", "magic", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown defense 'magic'" in err and not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["backdoor-defend", str(source_dir), "--defense", "ft", "--out", str(out)])
    assert e.value.code == 2 and "records no backdoor" in capsys.readouterr().err
    assert not any(out.rglob("*.safetensors"))
