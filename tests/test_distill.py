"""Distillation: the KD loss, KD / defensive / ARD students, the `distill` CLI and its study
(spec round trip, the teacher's hash in the ids, report), grid students."""

import json
import re
import shutil

import pytest
import torch

from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint, save_checkpoint
from robust_transfer.report.distill import comparison_rows
from robust_transfer.report.study import make_report
from robust_transfer.studies import load_study
from robust_transfer.studies.distill import DistillStudy, measure, pgd_attack
from robust_transfer.train import (
    DistillConfig,
    SoftLabelLoss,
    SourceConfig,
    TemperatureLoss,
    TrainConfig,
    fit,
    kd_loss,
    train_source,
)
from robust_transfer.train.distill import kl_to_teacher
from robust_transfer.train.source import build_source_model
from robust_transfer.transfer.grid import run_grid
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.spec import parse_spec


def _reference_kd(s, t, y, temperature, alpha):
    """Hinton KD written out: explicit softmax, logs and sums; KL summed over classes and
    divided by the number of examples."""
    def softmax(z):
        e = torch.exp(z - z.max(1, keepdim=True).values)
        return e / e.sum(1, keepdim=True)

    p, q = softmax(t / temperature), softmax(s / temperature)
    kl = (p * (torch.log(p) - torch.log(q))).sum() / len(s)
    ce = -torch.log(softmax(s)[torch.arange(len(y)), y]).sum() / len(s)
    return (1 - alpha) * ce + alpha * temperature**2 * kl, kl


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kd_loss_equals_the_written_out_formula(temperature, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    expected, kl = _reference_kd(s.double(), t.double(), y, temperature, alpha)
    got = kd_loss(s.double(), t.double(), y, temperature, alpha)
    assert torch.allclose(got, expected, rtol=1e-10)
    if alpha == 1.0:  # "batchmean", not "mean": a per-class average is 5x smaller
        per_class_mean = temperature**2 * kl / s.shape[1]
        assert not torch.allclose(got, per_class_mean, rtol=1e-3)


def test_kd_loss_rejects_bad_settings():
    s = torch.zeros(2, 3)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(UserError, match="temperature must be > 0"):
        kd_loss(s, s, y, 0.0, 0.5)
    with pytest.raises(UserError, match=r"alpha must be in \[0, 1\]"):
        kd_loss(s, s, y, 4.0, 1.5)


def _recipe(epochs=3, **kw):
    """Students of the `source_dir` teacher: its recipe, another seed (not its replica)."""
    return SourceConfig(task="synthetic-0to4", attack_steps=2,
                        train=TrainConfig(epochs=epochs, batch_size=64, seed=1,
                                          schedule="constant"), **kw)


def test_distilled_student_moves_toward_its_teacher(source_dir):
    teacher, _ = load_checkpoint(source_dir)
    cfg = _recipe(distill=DistillConfig("kd", 4.0, 0.9, {"eps": 0.0, "norm": "l2"}))
    alone, _ = train_source(_recipe())
    student, card = train_source(cfg, teacher=teacher)
    x = load_task("synthetic-0to4").test.x
    assert kl_to_teacher(student, teacher, x) < 0.8 * kl_to_teacher(alone, teacher, x)
    assert card.distill["method"] == "kd" and card.distill["alpha"] == 0.9


def test_defensive_distillation_masks_gradients_and_the_margin_loss_breaks_it():
    """Papernot et al. 2016 at T = 100, broken as Carlini & Wagner 2016 did: at T = 1 the
    logits are huge, CE gradients underflow to zero, PGD-CE fails; the margin loss does not."""
    task = load_task("digits-0to4")
    train = TrainConfig(epochs=10, lr=2.0, weight_decay=0.0, schedule="constant")
    cfg = SourceConfig(task="digits-0to4", train=train)
    teacher = build_source_model(cfg)
    fit(teacher, task.train, train, TemperatureLoss(100.0))
    student = build_source_model(cfg)
    fit(student, task.train, train, SoftLabelLoss(teacher, 100.0))
    x, y = task.test.x[:128], task.test.y[:128]
    ce = measure(student, x, y, pgd_attack("l2", "ce"), 1.0, "l2")
    margin = measure(student, x, y, pgd_attack("l2", "cw"), 1.0, "l2")
    assert ce["clean"] > 0.9
    assert ce["success_rate"] < 0.2 and margin["success_rate"] > 0.8
    assert any("all-zero input gradients" in w for w in ce["warnings"])


@pytest.mark.parametrize("args,match", [
    (["--temperature", "0"], "temperature must be > 0"),
    (["--alpha", "1.5"], r"alpha must be in \[0, 1\]"),
    (["--alpha", "-0.1"], r"alpha must be in \[0, 1\]"),
    (["--task", "synthetic"], "teacher has 5 classes but task 'synthetic' has 10"),
    (["--task", "digits-5to9"], "classes differ"),
    (["--student", "vgg"], "unknown student arch 'vgg'"),
    (["--adversarial", "--defensive"], "choose one"),
])
def test_distill_cli_bad_input_is_one_line_and_writes_nothing(cli, source_dir, tmp_path, args,
                                                              match):
    code, _, err = cli("distill", source_dir, "--out", tmp_path / "student", *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(match, err)
    assert not (tmp_path / "student").exists()


def test_distill_cli_reports_the_three_models_and_saves_the_student(cli, source_dir, tmp_path):
    out = tmp_path / "student"
    code, stdout, err = cli("distill", source_dir, "--out", out, "--epochs", "2", "--adversarial",
                          "--eps", "0.5")
    assert code == 0
    for name in ("teacher", "student alone", "KD student", "ARD student", "robustness"):
        assert name in stdout
    study = DistillStudy(source_dir, epochs=2, adversarial=True, eps=0.5)
    saved = study.models(out)["ARD student"]
    assert f"saved to {saved}" in err.replace("\n", "")
    _, card = load_checkpoint(saved)
    assert card.distill["method"] == "ard"
    assert card.distill["teacher"]["path"] == str(source_dir)
    assert card.distill["temperature"] == 4.0 and card.eps == 0.5
    rows = comparison_rows(read_results(out, study.required))
    assert [r["model"] for r in rows] == [
        "teacher", "student alone", "KD student", "ARD student"]
    assert rows[0]["robust_kept"] == 1.0 and rows[0]["kl_to_teacher"] != rows[0]["kl_to_teacher"]
    # `report DIR` recognises the study and writes the same summary
    code, _, err = cli("report", out, "--out", out / "again")
    assert code == 0, err
    assert (out / "again" / "distill_summary.md").read_text() == \
        (out / "distill_summary.md").read_text()


def test_distill_spec_round_trip_and_the_teachers_hash_in_the_ids(cli, source_dir, tmp_path):
    code, _, err = cli("distill", source_dir, "--defensive", "--epochs", "2", "--save-spec",
                       tmp_path / "spec.yaml")
    assert code == 0, err
    study = load_study(tmp_path / "spec.yaml")
    assert list(tmp_path.iterdir()) == [tmp_path / "spec.yaml"]  # nothing run
    assert study == DistillStudy(source_dir, defensive=True, epochs=2)
    assert (study.temperature, study.eps, study.norm, study.task) == (
        100.0, 1.0, "l2", "synthetic-0to4")  # resolved from the method and the teacher
    # teacher, student alone, defensive student x PGD-CE, + margin and CW for two students
    assert len(set(study.run_ids())) == 7
    # the same teacher elsewhere: the same students and runs; other weights: none of them
    copy = shutil.copytree(source_dir, tmp_path / "copy")
    moved = DistillStudy(copy, defensive=True, epochs=2)
    assert moved.run_ids() == study.run_ids()
    assert moved.models(tmp_path).keys() == study.models(tmp_path).keys()
    assert list(moved.models(tmp_path).values())[1:] == list(study.models(tmp_path).values())[1:]
    model, card = load_checkpoint(source_dir)
    with torch.no_grad():
        next(model.parameters()).mul_(1.001)
    other = save_checkpoint(model, tmp_path / "other", card)
    assert not set(DistillStudy(other, defensive=True, epochs=2).run_ids()) & set(
        study.run_ids())
    # the positional teacher is needed without --spec
    code, _, err = cli("distill", "--out", tmp_path / "x")
    assert code == 2 and err.startswith("error:") and "TEACHER" in err
    assert not (tmp_path / "x").exists()


def test_distill_report_orders_models_keeps_robustness_and_tells_the_masking_story():
    """From a hand-made table in the study's columns: teacher first, robustness kept =
    robust / the teacher's, the story's rows (defensive student first, attacks in order)
    and every warning that fired, once."""
    import pandas as pd

    from robust_transfer.report.distill import distill_summary_markdown, story_rows
    from robust_transfer.studies.distill import ALONE, CW_L2, DEFENSIVE, PGD_CE, PGD_MARGIN

    def row(model, role, attack, robust, warning=""):
        return {"model": model, "role": role, "attack": attack, "source_task": "digits",
                "temperature": 100.0, "alpha": 0.9, "eps": 1.0, "norm": "l2",
                "test_accuracy": 0.9, "robust_accuracy": robust, "attack_success_rate": 0.5,
                "kl_to_teacher": float("nan") if role == "teacher" else 0.1,
                "masking_warnings": warning}

    df = pd.DataFrame([row(ALONE, "student", CW_L2, 0.1), row(DEFENSIVE, "student", PGD_CE,
                       0.8, "zero grads"), row(ALONE, "student", PGD_CE, 0.2),
                       row("teacher at T=100", "teacher", PGD_CE, 0.4),
                       row(DEFENSIVE, "student", PGD_MARGIN, 0.05, "zero grads\nrising"),
                       row(DEFENSIVE, "student", CW_L2, 0.3), row(ALONE, "student",
                       PGD_MARGIN, 0.15)])
    rows = comparison_rows(df)
    assert [(r["model"], r["robust_kept"]) for r in rows] == [
        ("teacher at T=100", 1.0), (ALONE, 0.5), (DEFENSIVE, 2.0)]
    story = story_rows(df)
    assert [(r["model"], r["attack"]) for r in story] == [
        (DEFENSIVE, PGD_CE), (DEFENSIVE, PGD_MARGIN), (DEFENSIVE, CW_L2),
        (ALONE, PGD_CE), (ALONE, PGD_MARGIN), (ALONE, CW_L2)]
    assert story[1]["warnings"] == ["zero grads", "rising"] and story[3]["warnings"] == []
    text = distill_summary_markdown(df)
    assert text.count("gradient-masking warning: zero grads") == 1
    assert "| teacher at T=100 | 0.9000 | 0.4000 | 1.0000 | nan |" in text
    assert story_rows(df[df.model != DEFENSIVE]) == []


GRID = {
    "source": {"task": "synthetic-0to4", "epochs": 2, "attack_steps": 2},
    "sources": [{"eps": 0.0}, {"eps": 0.5, "norm": "l2"},
                {"distill": {"teacher": {"eps": 0.5, "norm": "l2"}, "temperature": 4,
                             "alpha": 0.9, "adversarial": True}}],
    "targets": ["synthetic-5to9"],
    "images_per_class": [2],
    "unfrozen_blocks": [0],
    "epochs": 2,
    "seeds": [0, 1],
}


def test_grid_spec_distill_key_parses():
    spec = parse_spec(GRID)
    student = spec.sources[2]
    assert not student.natural and student.distill.method == "ard"
    assert (student.eps, student.norm) == (0.5, "l2")  # ARD's threat model: the teacher's
    assert student.distill.teacher == spec.sources[1]


@pytest.mark.parametrize("entry,match", [
    ({"distill": {"teacher": {"eps": 1.0}}}, "not one of the spec's sources"),
    ({"eps": 0.5, "distill": {"teacher": {"eps": 0.5}}}, "give eps only with adversarial"),
    ({"distill": {"teacher": {"eps": 0.5}, "temperature": -1}}, "temperature must be > 0"),
    ({"distill": {"teacher": {"eps": 0.5}, "alpha": 2}}, "alpha must be in"),
    ({"distill": {"teacher": {"eps": 0.5}, "tau": 2}}, "unknown key 'tau'"),
    ({"distill": {"temperature": 2}}, "needs a teacher"),
])
def test_grid_spec_bad_distill_entries(entry, match):
    with pytest.raises(UserError, match=match):
        parse_spec({**GRID, "sources": [*GRID["sources"][:2], entry]})


def test_grid_with_a_distilled_source_trains_the_teacher_first_and_labels_the_student(
        tmp_path):
    out = tmp_path / "grid"
    df = read_results(run_grid(parse_spec(GRID), out))
    student = df[df.source_distill != ""]
    assert set(student.source_distill) == {"ARD T=4 α=0.9 ← L2 ε=0.5"}
    natural = df[(df.source_eps == 0) & (df.source_distill == "")]
    assert set(student.source_recipe) == set(natural.source_recipe)  # paired with natural
    [student_dir] = (out / "sources").glob("ard-*")
    meta = json.loads((student_dir / "meta.json").read_text())
    assert meta["teacher_path"].endswith(next((out / "sources").glob("l2-eps0.5-*")).name)
    summary = make_report(out, tmp_path / "rep").summary.read_text()
    assert "| Δ ARD T=4 α=0.9 ← L2 ε=0.5 |" in summary and "| Δ L2 ε=0.5 |" in summary

