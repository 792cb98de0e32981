"""Distillation: the KD loss, KD / defensive / ARD students, the `distill` CLI, grid students."""

import json
import re

import pytest
import torch

from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint
from robust_transfer.report.study import make_report
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
from robust_transfer.train.distill_study import kl_to_teacher, measure, pgd_attack
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
    student, meta = train_source(cfg, teacher=teacher)
    x = load_task("synthetic-0to4").test.x
    assert kl_to_teacher(student, teacher, x) < 0.8 * kl_to_teacher(alone, teacher, x)
    assert meta.distill["method"] == "kd" and meta.distill["alpha"] == 0.9


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
    code, stdout, _ = cli("distill", source_dir, "--out", out, "--epochs", "2", "--adversarial",
                          "--eps", "0.5")
    assert code == 0
    for name in ("teacher", "student alone", "KD student", "ARD student", "robustness"):
        assert name in stdout
    _, meta = load_checkpoint(out)
    assert meta.distill["method"] == "ard"
    assert meta.distill["teacher"]["path"] == str(source_dir)
    assert meta.distill["temperature"] == 4.0 and meta.eps == 0.5
    assert [r["model"] for r in meta.comparison] == [
        "teacher", "student alone", "KD student", "ARD student"]


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

