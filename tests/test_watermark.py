"""Watermarking by backdoor (Adi et al. 2018): key, embedding, binomial and permutation
verification, the four removal attacks, the study, its figure and the CLI."""

from __future__ import annotations

import copy
import json
from fractions import Fraction
from math import comb

import pandas as pd
import pytest
import torch

from robust_transfer.backdoors.watermark import (
    ATTACKS,
    KEY_META,
    KEY_WEIGHTS,
    RemovalConfig,
    binomial_p_value,
    load_key,
    make_key,
    permutation_test,
    remove,
    save_key,
    train_watermarked,
    transfer_verify,
    verify,
)
from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint, save_checkpoint
from robust_transfer.models.base import linear_head
from robust_transfer.report.watermark_figures import watermark_figure
from robust_transfer.studies.watermark import WatermarkRemoval, study_table
from robust_transfer.train import SourceConfig, TrainConfig, train_source
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.runner import run_study

TASK = "digits-0to4"
EPOCHS = 15


def recipe(seed: int) -> SourceConfig:
    return SourceConfig(task=TASK, train=TrainConfig(epochs=EPOCHS, seed=seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A watermarked digits model, its key, an independent clean model (same recipe, other
    seed), and the first two saved (checkpoint and key in separate directories)."""
    task = load_task(TASK)
    key = make_key(task.num_classes, task.input_shape, n=100, seed=7)
    model, card = train_watermarked(recipe(0), key)
    independent, ind_card = train_source(recipe(1))
    root = tmp_path_factory.mktemp("wm")
    save_checkpoint(model, root / "wm", card)
    save_checkpoint(independent, root / "clean", ind_card)
    save_key(key, root / "key", {"task": TASK})
    return {"model": model, "key": key, "independent": independent, "root": root,
            "task": task}


def exact_tail(correct: int, n: int, k: int) -> float:
    """P(X >= correct), X ~ Bin(n, 1/k), in exact rational arithmetic."""
    p = Fraction(1, k)
    return float(sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(correct, n + 1)))


def test_watermarked_model_is_owned_and_independent_is_not(trained):
    v = verify(trained["model"], trained["key"])
    assert v["owned"] and v["p_value"] < 0.01 and v["trigger_accuracy"] > 0.8
    assert v["chance"] == pytest.approx(0.2)
    w = verify(trained["independent"], trained["key"])
    assert not w["owned"] and w["p_value"] > 0.01 and w["trigger_accuracy"] < 0.4
    assert w["n"] == 100 and w["correct"] == round(100 * w["trigger_accuracy"])
    with pytest.raises(UserError, match="alpha"):
        verify(trained["model"], trained["key"], alpha=1.5)


def test_binomial_tail_matches_exact_computation(trained):
    for correct, n, k in [(0, 10, 2), (3, 10, 2), (21, 100, 5), (40, 100, 5), (100, 100, 10),
                          (7, 100, 10)]:
        assert binomial_p_value(correct, n, 1 / k) == pytest.approx(exact_tail(correct, n, k),
                                                                    rel=1e-9, abs=1e-300)
    v = verify(trained["independent"], trained["key"])
    assert v["p_value"] == pytest.approx(exact_tail(v["correct"], 100, 5), rel=1e-9)


def test_key_is_seeded_abstract_and_round_trips(tmp_path):
    key = make_key(5, (1, 8, 8), n=50, seed=3)
    assert key.x.shape == (50, 1, 8, 8) and key.x.min() >= 0 and key.x.max() <= 1
    assert key.y.min() >= 0 and key.y.max() <= 4 and len(key.y.unique()) == 5
    assert len(torch.unique(key.x.flatten(1), dim=0)) == 50  # 50 different images
    again, other = make_key(5, (1, 8, 8), n=50, seed=3), make_key(5, (1, 8, 8), n=50, seed=4)
    assert torch.equal(key.x, again.x) and torch.equal(key.y, again.y)
    assert not torch.equal(key.x, other.x)
    save_key(key, tmp_path / "k", {"task": TASK})
    loaded, meta = load_key(tmp_path / "k")
    assert torch.equal(loaded.x, key.x) and torch.equal(loaded.y, key.y)
    assert (loaded.num_classes, loaded.seed, meta["task"], meta["n"]) == (5, 3, TASK, 50)


def test_corrupt_or_missing_key_is_a_user_error(tmp_path):
    save_key(make_key(5, (1, 8, 8), n=20, seed=0), tmp_path / "k")
    weights = tmp_path / "k" / KEY_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        load_key(tmp_path / "k")
    (tmp_path / "k" / KEY_META).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_key(tmp_path / "k")
    with pytest.raises(UserError, match="no watermark key"):
        load_key(tmp_path / "missing")


def _non_head(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def test_removal_attacks_change_what_they_should(trained):
    model, task = trained["model"], trained["task"]
    before, head = _non_head(model), model.head.weight.detach().clone()
    changed = {}
    for attack in ATTACKS:
        attacked = remove(model, attack, task, RemovalConfig(epochs=2, seed=1))
        after = _non_head(attacked)
        changed[attack] = any(not torch.equal(before[k], after[k]) for k in before)
        assert not torch.equal(attacked.head.weight, head)
    assert changed == {"FTLL": False, "RTLL": False, "FTAL": True, "RTAL": True}
    assert torch.equal(model.head.weight, head) and not _non_head(model).keys() - before.keys()
    # with a vanishing learning rate the head stays where each attack starts it: the trained
    # head for FT*, a fresh one drawn from the seed for RT*
    fresh = linear_head(model.feature_dim, 5, torch.Generator().manual_seed(1)).weight
    for attack in ATTACKS:
        still = remove(model, attack, task, RemovalConfig(epochs=1, lr=1e-12, seed=1))
        start = fresh if attack.startswith("RT") else head
        assert torch.allclose(still.head.weight, start, atol=1e-7), attack


def test_permutation_test_refuses_a_constant_model_and_finds_a_relabelled_one(trained):
    key = trained["key"]
    constant = permutation_test(torch.zeros(100, dtype=torch.long), key.y, 5, 5)
    assert constant["mapped_accuracy"] == 1.0 and constant["p_value"] > 0.01
    relabelled = permutation_test((key.y + 2) % 5, key.y, 5, 5, permutations=500)
    assert relabelled["mapped_accuracy"] == 1.0 and relabelled["p_value"] == pytest.approx(1 / 501)
    assert 0.1 < relabelled["null_mean"] < 0.35
    # a model whose head sends every trigger image to class 3
    stuck = copy.deepcopy(trained["independent"])
    with torch.no_grad():
        stuck.head.weight.zero_()
        stuck.head.bias.copy_(torch.tensor([0.0, 0, 0, 10, 0]))
    v = transfer_verify(stuck, key)
    assert v["trigger_accuracy"] == 1.0 and not v["owned"] and v["p_value"] > 0.01
    assert verify(stuck, key)["p_value"] > 0.01


def test_study_table_and_figure(trained, tmp_path, cli):
    root = trained["root"]
    study = WatermarkRemoval(root / "wm", root / "key", attacks=("FTLL", "RTAL"),
                             removal_epochs=2, unfrozen_blocks=(0,), images_per_class=5,
                             transfer_epochs=3, seeds=(0,), permutations=200)
    done = []
    run_study(study, tmp_path, on_run=done.append)
    assert sorted(done) == sorted(study.run_ids()) and len(done) == 6
    table = study_table(read_results(tmp_path, study.required))
    assert list(table.model) == ["watermarked", "independent", "FTLL", "RTAL", "transfer k=0",
                                 "transfer k=0 (independent)"]
    base = table.set_index("model")
    assert base.loc["watermarked", "owned"] and not base.loc["independent", "owned"]
    assert base.loc["transfer k=0", "verification"] == "permutation"
    assert base.loc["transfer k=0", "target_task"] == "digits-5to9"
    assert base.loc["transfer k=0 (independent)", "accuracy_change"] == 0
    assert set(table.alpha) == {0.01}
    # the artifact is the independent model: the checkpoint's recipe with the next seed
    v = verify(trained["independent"], trained["key"])
    assert base.loc["independent", "trigger_accuracy"] == v["trigger_accuracy"]
    assert base.loc["independent", "p_value"] == v["p_value"]
    # `report DIR` recognises the study's folder and writes its table and figure
    code, out, err = cli("report", tmp_path, "--out", tmp_path / "report")
    assert code == 0, err
    stored = pd.read_parquet(tmp_path / "report" / "watermark_study.parquet")
    assert list(stored.model) == list(table.model)
    assert (tmp_path / "report" / "watermark_study.png").stat().st_size > 0
    fig = watermark_figure(table)
    top, bottom = fig.axes
    ticks = [t.get_text() for t in bottom.get_xticklabels()]
    assert ticks[:4] == ["watermarked", "independent", "FTLL", "RTAL"]
    assert "transfer k=0\n(independent)" in ticks
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert any("chance" in s for s in legend) and any("trigger-set" in s for s in legend)
    assert any("clean test accuracy" in s for s in legend)
    below = [t.get_text() for t in bottom.get_legend().get_texts()]
    assert "alpha = 0.01 (owned below)" in below
    assert "p < 1e-12 (value on the bar above)" in below  # the watermarked model's p
    notes = [t.get_text() for t in top.texts]
    assert len(notes) == len(table) and all(s.startswith("p=") for s in notes)
    assert "1/1 owned" in notes[0] and "0/1 owned" in notes[1]
    assert bottom.get_yscale() == "log" and top.get_ylabel() == "accuracy"


def test_cli_verify_remove_and_embed(trained, cli, tmp_path):
    root = trained["root"]
    code, out, _ = cli("watermark", "verify", root / "wm", "--key", root / "key")
    assert code == 0 and "OWNED" in out and "NOT OWNED" not in out and "binomial" in out
    code, out, _ = cli("watermark", "verify", root / "clean", "--key", root / "key")
    assert code == 0 and "NOT OWNED" in out
    code, out, _ = cli("watermark", "verify", root / "wm", "--key", root / "key", "--test",
                       "permutation", "--permutations", "200")
    assert code == 0 and "permutation" in out and "NOT OWNED" not in out and "0.00498" in out
    code, out, err = cli("watermark", "remove", root / "wm", "--key", root / "key", "--out",
                         tmp_path / "study", "--attack", "RTLL", "--transfer-task", "none",
                         "--seeds", "1", "--epochs", "2")
    assert code == 0, err
    table = pd.read_parquet(tmp_path / "study" / "watermark_study.parquet")
    assert list(table.model) == ["watermarked", "independent", "RTLL"]
    assert (tmp_path / "study" / "watermark_study.png").stat().st_size > 0
    assert "RTLL" in out and "owned" in out
    code, out, err = cli("watermark", "embed", "--out", tmp_path / "ck", "--key",
                         tmp_path / "key", "--epochs", "1", "--trigger-size", "20")
    assert code == 0, err
    model, card = load_checkpoint(tmp_path / "ck")
    key, key_meta = load_key(tmp_path / "key")
    assert len(key) == 20 and key_meta["task"] == TASK and card.watermark["trigger_size"] == 20
    assert not any(p.name.startswith("key") for p in (tmp_path / "ck").iterdir())
    assert "x" not in json.loads((tmp_path / "ck" / "meta.json").read_text())["watermark"]


def test_cli_refuses_a_key_inside_the_checkpoint(cli, tmp_path, trained):
    code, out, err = cli("watermark", "embed", "--out", tmp_path / "ck", "--key",
                         tmp_path / "ck" / "key", "--epochs", "1")
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "--key" in err and not (tmp_path / "ck").exists()
    corrupt = tmp_path / "bad"
    corrupt.mkdir()
    (corrupt / KEY_META).write_text("{}")
    (corrupt / KEY_WEIGHTS).write_bytes(b"junk")
    code, _, err = cli("watermark", "verify", trained["root"] / "wm", "--key", corrupt)
    assert code == 2 and "corrupt watermark key" in err
