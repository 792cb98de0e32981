"""Backdoor survival under model updates: drift functions (uniform at strength 0, seeded,
bounded, an exact rotation), forgetting under a strong drift and the faster-forgetting LR
schedule, the figure's lines, and the CLI (files written; bad input: one line, exit 2, nothing
written)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from robust_transfer.backdoors.source import train_backdoor_source
from robust_transfer.backdoors.updates import (
    SurvivalConfig,
    UpdateConfig,
    drift_metrics,
    run_survival,
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
from robust_transfer.report.updates_figures import headline_rows, survival_figure

# Small but real: the demo's task and backdoor, a shorter source and 3 updates.
CFG = SurvivalConfig(source_epochs=10, drifts=("rotation",), strengths=(0.0, 1.0), updates=3,
                     seeds=(0,))


@pytest.fixture(scope="module")
def poisoned():
    model, card = train_backdoor_source(CFG.source(0))
    assert card.metrics["asr"] > 0.9  # the backdoor is there to be forgotten
    return model, card


@pytest.fixture(scope="module")
def table(poisoned):
    return run_survival(CFG, source=poisoned[0])


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


def test_no_drift_is_one_run_for_every_drift_kind(poisoned):
    cfg = SurvivalConfig(drifts=("class-prior", "rotation"), strengths=(0.0,), updates=1,
                         update_images=(64,), update_epochs=1, lr_schedules=("constant",),
                         seeds=(0,))
    t = run_survival(cfg, source=poisoned[0])
    cols = ["update", "asr", "clean_accuracy", "drift_accuracy"]
    assert t[t.drift == "class-prior"][cols].reset_index(drop=True).equals(
        t[t.drift == "rotation"][cols].reset_index(drop=True))


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
    for name in ("survival.parquet", "figU1_survival.png", "survival_summary.md"):
        assert (out / name).is_file()
    t = pd.read_parquet(out / "survival.parquet")
    assert set(t.images_per_update) == {32, 64} and set(t.strength) == {0.0, 1.0}
    assert "backdoor survival" in stdout and "gone at" in stdout
    # one row per arm: no drift once per update size (not once per drift kind), then the drift
    rows = headline_rows(t)
    assert [(r["drift"], r["update"]) for r in rows] == [
        ("none", "32 img x 1 ep"), ("class-prior 1", "32 img x 1 ep"),
        ("none", "64 img x 1 ep"), ("class-prior 1", "64 img x 1 ep")]


def test_cli_from_a_checkpoint_and_its_task(cli, tmp_path, poisoned):
    model, meta = poisoned
    ckpt = save_checkpoint(model, tmp_path / "poisoned", meta)
    out = tmp_path / "from-ckpt"
    code, _, stderr = cli("backdoor", "updates", "--out", out, "--checkpoint", ckpt,
                          "--drift", "rotation", "--strength", 1, "--updates", 1,
                          "--update-images", 32, "--update-epochs", 1, "--seeds", 2)
    assert code == 0, stderr
    t = pd.read_parquet(out / "survival.parquet")
    assert set(t.source) == {"checkpoint"} and set(t.seed) == {0, 1}
    code, _, stderr = cli("backdoor", "updates", "--out", tmp_path / "x", "--checkpoint", ckpt,
                          "--task", "digits-0to4")
    assert code == 2 and stderr.count("\n") == 1 and "differs" in stderr
    assert not (tmp_path / "x").exists()


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
