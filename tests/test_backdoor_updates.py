"""Backdoor survival under model updates: drift functions (uniform at strength 0, seeded,
bounded, an exact rotation), forgetting under a strong drift and the faster-forgetting LR
schedule, the figure's lines, the study's spec (round trip, the checkpoint's hash in the run
ids) and the CLI (files written; bad input: one line, exit 2, nothing written)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pandas as pd
import pytest
import torch

from robust_transfer.backdoors.source import train_backdoor_source
from robust_transfer.backdoors.updates import (
    UpdateConfig,
    drift_metrics,
    survival_curve,
    update_data,
)
from robust_transfer.data import load_task
from robust_transfer.data.drift import (
    class_prior_sample,
    class_priors,
    drift_magnitude,
    rotate,
    shift_inputs,
)
from robust_transfer.errors import UserError
from robust_transfer.models import save_checkpoint
from robust_transfer.models.runtime import predict_logits
from robust_transfer.report.updates_figures import (
    OLD_NAMES,
    headline_rows,
    make_survival_report,
    survival_figure,
)
from robust_transfer.studies import load_study
from robust_transfer.studies.updates import SurvivalStudy
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.runner import run_study

# Small but real: the demo's task and backdoor, a shorter source and 3 updates.
CFG = SurvivalStudy(source_epochs=10, drifts=("rotation",), strengths=(0.0, 1.0), updates=3,
                    seeds=(0,))


def run_survival(study: SurvivalStudy, out) -> pd.DataFrame:
    """The study's table, run into `out` by the one runner."""
    return read_results(run_study(study, out), study.required)


@pytest.fixture(scope="module")
def poisoned():
    model, card = train_backdoor_source(CFG.source(0))
    assert card.metrics["asr"] > 0.9  # the backdoor is there to be forgotten
    return model, card


@pytest.fixture(scope="module")
def checkpoint(poisoned, tmp_path_factory):
    return save_checkpoint(*poisoned[:1], tmp_path_factory.mktemp("ckpt") / "poisoned",
                           poisoned[1])


@pytest.fixture(scope="module")
def table(checkpoint, tmp_path_factory):
    return run_survival(replace(CFG, checkpoint=checkpoint),
                        tmp_path_factory.mktemp("updates") / "study")


def _final_asr(table: pd.DataFrame, strength: float, lr_schedule: str) -> float:
    rows = table[(table.strength == strength) & (table.lr_schedule == lr_schedule)]
    return float(rows[rows["update"] == CFG.updates].asr.iloc[0])


def test_class_priors_uniform_at_zero_seeded_and_sampled_as_drawn():
    assert torch.equal(class_priors(10, 0.0, seed=5), torch.full((10,), 0.1))
    p = class_priors(10, 1.0, seed=5)
    assert torch.equal(p, class_priors(10, 1.0, seed=5))
    assert not torch.equal(p, class_priors(10, 1.0, seed=6))
    assert torch.isclose(p.sum(), torch.tensor(1.0)) and (p > 0).all()
    assert torch.allclose(class_priors(10, 0.5, 5), 0.5 * torch.full((10,), 0.1) + 0.5 * p)
    y = load_task("digits").train.y
    for priors in (torch.full((10,), 0.1), p):
        index = class_prior_sample(y, priors, 20_000, seed=1)
        assert torch.equal(index, class_prior_sample(y, priors, 20_000, seed=1))
        freq = torch.bincount(y[index], minlength=10) / 20_000.0
        assert torch.allclose(freq, priors, atol=0.015)  # binomial sd <= 0.0035
    assert not torch.equal(class_prior_sample(y, p, 100, 1), class_prior_sample(y, p, 100, 2))
    assert drift_magnitude(0.5, 2, 4) == 0.25 and drift_magnitude(1.0, 0, 5) == 0.0


def test_inputs_drift_is_bounded_and_an_exact_rotation():
    x = torch.rand(16, 1, 8, 8)
    for m in (0.0, 0.3, 1.0):
        out = shift_inputs(x, "rotation", m)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(shift_inputs(x, "rotation", 0.0), x)
    assert torch.equal(shift_inputs(x, "class-prior", 1.0), x)  # a label shift keeps images
    assert torch.allclose(rotate(x, 90.0), torch.rot90(x, 1, (2, 3)), atol=1e-5)
    assert not torch.allclose(shift_inputs(x, "rotation", 1.0), x)
    with pytest.raises(UserError, match="strength"):
        shift_inputs(x, "rotation", 1.5)
    task = load_task("digits")
    a, b = (update_data(task, "rotation", 0.5, 64, seed=0, step=1) for _ in range(2))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    c = update_data(task, "rotation", 0.5, 64, seed=0, step=2)
    assert not torch.equal(a.y, c.y)


def test_strong_drift_forgets_the_backdoor_and_the_fast_lr_faster(table):
    start = table[table["update"] == 0]
    assert (start.asr > 0.9).all()  # update 0 = the poisoned model, in every arm
    # Strong drift with the fast-forgetting LR: the backdoor is (nearly) gone after 3 updates,
    # and well below the poisoned model's ASR; no updates would leave it where it started.
    strong_fast = _final_asr(table, 1.0, "triangular")
    assert strong_fast < 0.5 * float(start.asr.iloc[0])
    # The triangular LR forgets at least as fast as the small constant LR of a plain update,
    # and the drift speeds it: the same LR schedule without drift keeps more of the backdoor.
    assert strong_fast <= _final_asr(table, 1.0, "constant")
    assert strong_fast < _final_asr(table, 0.0, "triangular")
    # Under drift the model follows the current distribution: it stays accurate on it.
    end = table[(table.strength == 1.0) & (table["update"] == CFG.updates)]
    assert (end.drift_accuracy > 0.8).all()
    assert len(table) == 2 * 2 * (CFG.updates + 1)


def test_survival_curve_is_deterministic_and_starts_from_the_model(poisoned):
    model, _ = poisoned
    task = load_task("digits")
    before = [p.detach().clone() for p in model.parameters()]
    update = UpdateConfig(images=64, epochs=1)
    a, b = (survival_curve(model, task, CFG.backdoor, "class-prior", 1.0, 1, update, seed=0)
            for _ in range(2))
    assert pd.DataFrame(a).equals(pd.DataFrame(b)) and [r["update"] for r in a] == [0, 1]
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_no_drift_is_one_run_for_every_drift_kind(checkpoint, tmp_path):
    cfg = SurvivalStudy(checkpoint=checkpoint, drifts=("class-prior", "rotation"),
                        strengths=(0.0,), updates=1, update_images=(64,), update_epochs=1,
                        lr_schedules=("constant",), seeds=(0,))
    t = run_survival(cfg, tmp_path).sort_values("update")
    cols = ["update", "asr", "test_accuracy", "drift_accuracy"]
    assert t[t.drift == "class-prior"][cols].reset_index(drop=True).equals(
        t[t.drift == "rotation"][cols].reset_index(drop=True))
    assert t.run_id.nunique() == 2  # one run per drift kind, computed once


def test_drift_asr_stamps_the_trigger_on_the_drifted_test_images(poisoned, table):
    model, _ = poisoned
    task, backdoor = load_task(CFG.task), CFG.source(0).backdoor
    start = table[table["update"] == 0]
    assert start.drift_asr.to_numpy() == pytest.approx(start.asr.to_numpy())  # no drift yet
    keep = task.test.y != backdoor.target
    rotated = rotate(task.test.x[keep], 45.0)
    pred = predict_logits(model, backdoor.trigger(task.input_shape).apply(rotated)).argmax(1)
    by_hand = (pred == backdoor.target).float().mean().item()
    drifted = drift_metrics(model, task, backdoor, "rotation", 1.0, 0)
    assert drifted["drift_asr"] == pytest.approx(by_hand)
    undrifted = drift_metrics(model, task, backdoor, "rotation", 0.0, 0)
    assert by_hand != pytest.approx(undrifted["drift_asr"])

def test_figure_shows_one_line_per_strength_and_lr_schedule(table):
    fig, axes = survival_figure(table)
    labels = [line.get_label() for line in axes[0, 0].get_lines()]
    for expected in ("strength 0 (no drift), constant LR 0.01",
                     "strength 0 (no drift), triangular LR, peak 0.1",
                     "strength 1, constant LR 0.01", "strength 1, triangular LR, peak 0.1",
                     "chance 1/K = 0.10"):
        assert expected in labels
    assert axes.shape == (4, 1) and axes[0, 0].get_title() == "drift: rotation"
    assert axes[0, 0].get_ylabel().startswith("ASR") and "current" not in axes[0, 0].get_ylabel()
    assert axes[1, 0].get_ylabel() == "ASR, current distribution"
    assert axes[3, 0].get_ylabel() == "C-Acc, current distribution"
    _, old = survival_figure(table.drop(columns="drift_asr"))  # a table from before drift_asr
    assert old.shape == (3, 1)
    assert axes[-1, 0].get_xlabel().startswith("model update")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "strength 1, triangular LR, peak 0.1" in legend
    dashed = [ln for ln in axes[0, 0].get_lines() if "triangular" in ln.get_label()]
    assert all(ln.get_linestyle() == "--" for ln in dashed)


def test_cli_writes_its_files(cli, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = cli("backdoor", "updates", "--out", out, "--source-epochs", 2,
                               "--drift", "class-prior", "--strength", 0, 1, "--updates", 1,
                               "--update-images", 32, 64, "--update-epochs", 1,
                               "--lr-schedule", "constant", "--seeds", 1, "--device", "cpu")
    assert code == 0, stderr
    for name in ("results.parquet", "figU1_survival.png", "survival_summary.md"):
        assert (out / name).is_file()
    t = pd.read_parquet(out / "results.parquet")
    assert set(t.train_images) == {32, 64} and set(t.strength) == {0.0, 1.0}
    assert "backdoor survival" in stdout and "gone at" in stdout
    code, _, stderr = cli("report", out, "--out", out / "again")  # recognised from spec.yaml
    assert code == 0, stderr
    assert (out / "again" / "survival_summary.md").read_text() == \
        (out / "survival_summary.md").read_text()
    # one row per arm: no drift once per update size (not once per drift kind), then the drift
    rows = headline_rows(t)
    assert [(r["drift"], r["update"]) for r in rows] == [
        ("none", "32 img x 1 ep"), ("class-prior 1", "32 img x 1 ep"),
        ("none", "64 img x 1 ep"), ("class-prior 1", "64 img x 1 ep")]


def test_cli_from_a_checkpoint_and_its_task(cli, tmp_path, checkpoint):
    ckpt = checkpoint
    out = tmp_path / "from-ckpt"
    code, _, stderr = cli("backdoor", "updates", "--out", out, "--checkpoint", ckpt,
                          "--drift", "rotation", "--strength", 1, "--updates", 1,
                          "--update-images", 32, "--update-epochs", 1, "--seeds", 2)
    assert code == 0, stderr
    t = pd.read_parquet(out / "results.parquet")
    assert set(t.source) == {"checkpoint"} and set(t.seed) == {0, 1}
    code, _, stderr = cli("backdoor", "updates", "--out", tmp_path / "x", "--checkpoint", ckpt,
                          "--task", "digits-0to4")
    assert code == 2 and stderr.count("\n") == 1 and "differs" in stderr
    assert not (tmp_path / "x").exists()


def test_spec_round_trip_and_the_checkpoint_hash_in_the_run_ids(cli, tmp_path, checkpoint,
                                                                poisoned):
    args = ("--drift", "rotation", "--strength", 1, "--updates", 1, "--update-images", 32,
            "--update-epochs", 1, "--seeds", 2)
    code, _, stderr = cli("backdoor", "updates", "--checkpoint", checkpoint, *args,
                          "--save-spec", tmp_path / "spec.yaml")
    assert code == 0, stderr
    study = load_study(tmp_path / "spec.yaml")
    assert list(tmp_path.iterdir()) == [tmp_path / "spec.yaml"]  # nothing run
    direct = SurvivalStudy(checkpoint=checkpoint, drifts=("rotation",), strengths=(1.0,),
                           updates=1, update_images=(32,), update_epochs=1, seeds=(0, 1))
    assert study == direct and study.task == "digits" and len(set(study.run_ids())) == 4
    # the same weights elsewhere: the same runs; other weights: other runs
    model, card = poisoned
    same = save_checkpoint(model, tmp_path / "copy", card)
    assert replace(direct, checkpoint=same).run_ids() == direct.run_ids()
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).mul_(1.001)
    other = save_checkpoint(changed, tmp_path / "other", card)
    assert not set(replace(direct, checkpoint=other).run_ids()) & set(direct.run_ids())
    # trained sources: their recipe is in the id
    assert not set(replace(CFG, source_epochs=9).run_ids()) & set(CFG.run_ids())
    with pytest.raises(UserError, match="differs from the checkpoint"):
        replace(direct, backdoor={"attack": "badnets", "rate": 0.2, "target": 0})
    code, _, stderr = cli("backdoor", "updates", *args)
    assert code == 2 and stderr.startswith("error:") and "--out" in stderr


def test_a_table_of_the_previous_version_still_reports(table, tmp_path):
    old = table.drop(columns="run_id").rename(columns={v: k for k, v in OLD_NAMES.items()})
    old.to_parquet(tmp_path / "survival.parquet")
    make_survival_report(tmp_path / "survival.parquet", tmp_path / "old")
    make_survival_report(table, tmp_path / "new")
    assert (tmp_path / "old" / "survival_summary.md").read_text() == \
        (tmp_path / "new" / "survival_summary.md").read_text()
    assert headline_rows(old) == headline_rows(table)


@pytest.mark.parametrize("args, message", [
    (("--strength", 1.5), "strength"),
    (("--drift", "wind"), "unknown drift"),
    (("--lr-schedule", "cosine"), "unknown lr schedule"),
    (("--updates", 0), "updates"),
    (("--update-images", 0), "images"),
    (("--seeds", 0), "seeds"),
    (("--task", "nope"), "unknown task"),
    (("--target", 12), "does not exist"),
])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(cli, tmp_path, args, message):
    out = tmp_path / "out"
    code, stdout, stderr = cli("backdoor", "updates", "--out", out, *args)
    assert code == 2 and stderr.startswith("error:") and stderr.count("\n") == 1
    assert message in stderr
    assert not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = cli("backdoor", "updates", "--out", blocker, "--updates", 1)
    assert code == 2 and "not a directory" in stderr
