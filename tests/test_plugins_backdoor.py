"""Triggers, backdoor attacks and backdoor defenses as plugins (`robust_transfer.plugins`):
their registries, trigger options from a spec and from the CLI checked pixel by pixel against
the papers' formulas, NeuBA through the same attack interface as BadNets, and defense options
from the CLI."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from robust_transfer.backdoors.defenses import DEFENSES, DefenseConfig, choose_pruned, clean_subset
from robust_transfer.backdoors.source import recorded_backdoor, train_backdoor_source
from robust_transfer.data import load_task
from robust_transfer.data.poison import BACKDOOR_ATTACKS, BackdoorConfig, poison
from robust_transfer.data.triggers import TRIGGERS, make_trigger
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import build_model, load_checkpoint
from robust_transfer.models.base import ModelSpec
from robust_transfer.studies.bias import BiasStudy
from robust_transfer.train import SourceConfig, TrainConfig
from robust_transfer.train.neuba import NeuBA, neuba_vectors, plant_objective
from robust_transfer.train.objectives import natural_loss
from robust_transfer.transfer.backdoor_eval import probe_triggers
from robust_transfer.transfer.spec import parse_spec

X = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def _blended(x: torch.Tensor, alpha: float, seed: int) -> torch.Tensor:
    """Chen et al. 2017, written out: (1 - alpha) x + alpha p, p uniform from `seed`."""
    pattern = torch.rand(tuple(x.shape[1:]), generator=torch.Generator().manual_seed(seed))
    return (1 - alpha) * x + alpha * pattern


def _sig(x: torch.Tensor, delta: float, f: int) -> torch.Tensor:
    """Barni et al. 2019, written out: x + delta sin(2 pi j f / W) on every row, clipped."""
    w = x.shape[-1]
    v = torch.tensor([delta * math.sin(2 * math.pi * j * f / w) for j in range(w)])
    return (x + v).clamp(0, 1)


def test_registries_name_every_plugin():
    assert TRIGGERS.names() == ("badnets", "blended", "sig", "wanet")
    assert "wanet" in TRIGGERS and list(TRIGGERS) == list(TRIGGERS.names())
    check_choice("trigger", "sig", TRIGGERS)
    assert BACKDOOR_ATTACKS.names() == (*TRIGGERS, "neuba")
    assert DEFENSES.names() == ("ft", "super-ft", "fine-pruning", "abl", "anp")
    help_text = TRIGGERS.options_help()
    assert "blended: alpha=0.2 (float)" in help_text and "wanet: k=4 (int)" in help_text
    assert "threshold=0.2 (float)" in DEFENSES.options_help()
    with pytest.raises(UserError, match="unknown backdoor attack 'magic'; allowed: badnets"):
        BackdoorConfig("magic")


def test_blended_alpha_and_sig_delta_from_a_spec_change_the_trigger():
    spec = parse_spec({
        "source": {"task": "digits-0to4", "epochs": 1},
        "sources": [{"eps": 0.0, "backdoor": {"attack": "blended", "rate": 0.1, "seed": 3,
                                              "trigger_options": {"alpha": 0.5}}},
                    {"eps": 0.0, "backdoor": {"attack": "sig", "rate": 0.1, "target": 1,
                                              "trigger_options": {"delta": 0.3,
                                                                  "frequency": 1}}}],
        "targets": ["digits-5to9"], "images_per_class": [1], "unfrozen_blocks": [0],
        "epochs": 1, "seeds": [0]})
    blended, sig = (s.backdoor.trigger((1, 8, 8)) for s in spec.sources)
    assert torch.allclose(blended.apply(X), _blended(X, 0.5, 3))
    assert not torch.allclose(blended.apply(X), _blended(X, 0.2, 3))  # not the default
    assert torch.allclose(sig.apply(X), _sig(X, 0.3, 1), atol=1e-6)
    assert not torch.allclose(sig.apply(X), _sig(X, 20 / 255, 2), atol=1e-3)
    # the options are the backdoor's record (so they enter its run id) and typed on the way in
    assert spec.sources[0].backdoor.to_dict()["trigger_options"] == {"alpha": 0.5}
    with pytest.raises(UserError, match="trigger 'sig' option frequency must be int"):
        BackdoorConfig("sig", trigger_options={"frequency": 1.5})


def test_trigger_options_from_the_cli(cli, tmp_path):
    out = tmp_path / "blended"
    code, _, err = cli("backdoor", "attack", "--task", "synthetic-0to4", "--trigger",
                       "blended", "--trigger-option", "alpha=0.5", "--epochs", "1",
                       "--seed", "2", "--out", out)
    assert code == 0, err
    _, card = load_checkpoint(out)
    trigger = recorded_backdoor(card).trigger((1, 8, 8))
    assert torch.allclose(trigger.apply(X), _blended(X, 0.5, 2))
    # a specific flag and --trigger-option feed one mapping
    cfgs = []
    for args in (["--wanet-s", "1"], ["--trigger-option", "s=1"]):
        code, _, err = cli("backdoor", "attack", "--trigger", "wanet", *args, "--target", "9",
                           "--out", tmp_path / "x", "--epochs", "1")
        assert code == 2 and "target class 9 does not exist" in err  # (options were fine)
        cfgs.append(err)
    assert cfgs[0] == cfgs[1]


@pytest.mark.parametrize("args, message", [
    (["backdoor", "attack", "--trigger", "blended", "--trigger-option", "beta=1"],
     "unknown option(s) beta for trigger 'blended'; allowed: alpha"),
    (["backdoor", "attack", "--trigger", "sig", "--trigger-option", "delta=big"],
     "trigger 'sig' option delta must be float, got 'big'"),
    (["backdoor", "attack", "--trigger", "wanet", "--wanet-k", "4", "--trigger-option",
      "k=3"], "trigger option k given twice"),
    (["backdoor", "attack", "--trigger", "neuba", "--trigger-option", "alpha=1"],
     "unknown option(s) alpha for backdoor attack 'neuba'; allowed: triggers, strength"),
    (["backdoor", "attack", "--trigger-option", "alpha"], "--trigger-option takes KEY=VALUE"),
    (["backdoor-defend", "nowhere", "--defense", "anp", "--defense-option", "prune_step=2"],
     "unknown defense option(s) prune_step for anp; allowed: alpha, batch_size"),
    (["backdoor-defend", "nowhere", "--defense", "fine-pruning", "--defense-option",
      "prune_step=0.5"], "backdoor defense 'fine-pruning' option prune_step must be int"),
    (["bias-transfer", "--feature", "sig", "--trigger-option", "alpha=0.3"],
     "unknown option(s) alpha for trigger 'sig'; allowed: delta, frequency"),
])
def test_bad_plugin_options_are_one_line_errors(cli, tmp_path, args, message):
    out = tmp_path / "out"
    code, _, err = cli(*args, "--out", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bias_transfer_sig_delta_from_the_cli(cli, tmp_path):
    cfg = BiasStudy(feature="sig", trigger_options={"delta": 0.3}, seeds=(0,))
    assert torch.allclose(cfg.backdoor.trigger((1, 8, 8)).apply(X), _sig(X, 0.3, 2), atol=1e-6)
    code, _, err = cli("bias-transfer", "--feature", "sig", "--trigger-option", "delta=0.3",
                       "--seeds", "1", "--images-per-class", "1", "--mode", "fixed",
                       "--target-data", "standard", "--source-epochs", "1", "--epochs", "1",
                       "--out", tmp_path / "bias")
    assert code == 0, err
    table = pd.read_parquet(tmp_path / "bias" / "results.parquet")
    assert set(table.trigger_options) == {json.dumps({"delta": 0.3})}


def test_neuba_and_badnets_share_one_attack_interface():
    task = load_task("synthetic-0to4")
    badnets = BackdoorConfig("badnets", rate=0.1, target=0).attack_plugin()
    neuba = BackdoorConfig("neuba", rate=0.5, seed=1,
                           trigger_options={"triggers": 2, "weight": 0.5}).attack_plugin()
    # plant: poisoned data (badnets) or clean data plus feature targets for the loss (neuba)
    data, index = badnets.poison(task.train, task.num_classes)
    assert len(index) == round(0.1 * len(task.train)) and (data.y[index] == 0).all()
    assert badnets.feature_targets((1, 8, 8), 16) is None
    same, none = neuba.poison(task.train, task.num_classes)
    assert same is task.train and len(none) == 0
    targets = neuba.feature_targets((1, 8, 8), 16)
    assert torch.equal(targets.vectors, neuba_vectors(2, 16))
    assert (targets.weight, targets.rate) == (0.5, 0.5)
    # probe: one trigger (badnets), several BadNets patches in distinct corners (neuba)
    (trigger,) = badnets.triggers((1, 8, 8))
    assert torch.equal(trigger.apply(X), make_trigger("badnets", (1, 8, 8)).apply(X))
    corners = [t.corner for t in neuba.triggers((1, 8, 8))]
    assert corners == ["bottom-right", "top-left"]
    assert len(probe_triggers(BackdoorConfig("neuba"), (1, 8, 8))) == 4
    assert not badnets.task_agnostic and neuba.task_agnostic
    # the objective that plants them: the base loss, or base + weight * feature distance
    assert plant_objective(badnets, natural_loss, (1, 8, 8), 16) is natural_loss
    model = build_model(ModelSpec("cnn-small", 5, 1), seed=0).eval()
    objective = plant_objective(neuba, natural_loss, (1, 8, 8), model.feature_dim)
    assert isinstance(objective, NeuBA)
    x, y = task.train.x[:8], task.train.y[:8]
    vectors = neuba_vectors(2, model.feature_dim)
    with torch.no_grad():
        feature = sum(((model.features(t.apply(x[:4])) - v) ** 2).mean()
                      for t, v in zip(neuba.triggers((1, 8, 8)), vectors, strict=True)) / 2
        expected = F.cross_entropy(model(x), y) + 0.5 * feature
        assert torch.allclose(objective(model, x, y), expected, atol=1e-5)


def test_train_source_plants_either_attack_and_records_it_as_before():
    train = TrainConfig(epochs=1, batch_size=64)
    for cfg in (BackdoorConfig("badnets", rate=0.1), BackdoorConfig("neuba", rate=1.0)):
        _, card = train_backdoor_source(SourceConfig(task="synthetic-0to4", backdoor=cfg,
                                                     train=train))
        recorded = card.backdoor
        assert {k: recorded[k] for k in cfg.to_dict()} == cfg.to_dict()
        if cfg.attack == "neuba":  # planted by the loss: no poisoned image, no index list
            assert recorded["poisoned_count"] == 0 and "poisoned_indices" not in recorded
        else:
            _, index = poison(load_task("synthetic-0to4").train, cfg, 5)
            assert recorded["poisoned_indices"] == index.tolist()
        assert 0 <= card.metrics["asr"] <= 1


def test_defense_options_set_the_config_and_reach_the_defense(cli, tmp_path):
    cfg = DefenseConfig().with_options({"prune_step": 4, "threshold": 0.5, "gamma": 0.7},
                                       ["fine-pruning", "anp", "abl"])
    assert (cfg.prune_step, cfg.anp.threshold, cfg.abl.gamma) == (4, 0.5, 0.7)
    assert cfg.options("fine-pruning").prune_step == 4 and cfg.anp.iterations == 2000
    with pytest.raises(UserError, match="ABL isolation loss"):
        DefenseConfig().with_options({"loss": "hinge"}, ["abl"])
    source = tmp_path / "src"
    code, _, err = cli("backdoor", "attack", "--task", "synthetic-0to4", "--epochs", "2",
                       "--out", source)
    assert code == 0, err
    out = tmp_path / "def"
    code, _, err = cli("backdoor-defend", source, "--defense", "fine-pruning", "--epochs", "1",
                       "--prune-drop", "0.5", "--defense-option", "prune_step=4",
                       "--out", out)
    assert code == 0, err
    _, card = load_checkpoint(out / "fine-pruning")
    assert card.defense_config["prune_step"] == 4
    model, _ = load_checkpoint(source)
    task = load_task("synthetic-0to4")
    expected = choose_pruned(model, clean_subset(task, 0.1, 0),
                             DefenseConfig(prune_drop=0.5, prune_step=4))
    table = pd.read_csv(out / "defenses.csv")
    assert table.pruned_channels[0] == len(expected) and len(expected) % 4 == 0
    assert len(expected) > 0
