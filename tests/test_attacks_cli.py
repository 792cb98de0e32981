"""CLI: `attack` and `transfer-matrix` on tiny checkpoints; bad input exits with code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from robust_transfer.cli import app, expand_multi_value_options
from robust_transfer.errors import UserError
from robust_transfer.models import save_checkpoint
from robust_transfer.train import SourceConfig, TrainConfig, train_source


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack_ckpts")
    out = []
    for name, eps in (("natural", 0.0), ("robust", 0.5)):
        model, card = train_source(SourceConfig(task="digits-0to4", eps=eps, norm="l2",
                                                attack_steps=2, train=TrainConfig(epochs=2)))
        out.append(save_checkpoint(model, root / name, card))
    return out


def run(args):
    return CliRunner().invoke(app, expand_multi_value_options([str(a) for a in args]))


def test_attack_command_writes_table_and_figures(checkpoints, tmp_path):
    out = tmp_path / "figs"
    result = run(["attack", checkpoints[0], "--attack", "pgd", "--norm", "linf",
                  "--eps", "0.05", "0.1", "0.2", "--n", "24", "--steps", "3", "--out", out])
    assert result.exit_code == 0, result.output
    assert "worst case" in result.output and "0.2000" in result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gallery.png", "robust_accuracy_vs_eps.png", "robustness.csv"]
    csv = (out / "robustness.csv").read_text()
    assert csv.count("worst case") == 3


def test_attack_cascade_and_l2(checkpoints, tmp_path):
    result = run(["attack", checkpoints[1], "--attack", "fgsm,deepfool", "--attack", "pgd",
                  "--norm", "l2", "--eps", "0.5", "1.0", "--n", "16", "--steps", "2",
                  "--gallery", "0", "--out", tmp_path])
    assert result.exit_code == 0, result.output
    for name in ("fgsm", "deepfool", "pgd", "worst case"):
        assert name in result.output
    assert not (tmp_path / "gallery.png").exists()


def test_transfer_matrix_command(checkpoints, tmp_path):
    result = run(["transfer-matrix", *checkpoints, "--attack", "pgd", "--norm", "l2",
                  "--eps", "0.5", "1.0", "--n", "24", "--steps", "3", "--out", tmp_path])
    assert result.exit_code == 0, result.output
    assert "crafted on" in result.output and "natural" in result.output
    assert (tmp_path / "transfer_matrix.png").stat().st_size > 1000
    assert (tmp_path / "transfer_matrix.csv").read_text().count("\n") == 1 + 2 * 4


@pytest.mark.parametrize("args, match", [
    (["--attack", "nope"], "unknown attack 'nope'"),
    (["--eps", "-0.1"], "eps must be >= 0"),
    (["--norm", "l3"], "unknown norm 'l3'"),
    (["--n", "0"], "--n must be >= 1"),
])
def test_bad_input_is_user_error(checkpoints, tmp_path, args, match):
    result = run(["attack", checkpoints[0], *args, "--out", tmp_path / "x"])
    assert isinstance(result.exception, UserError), result.output
    assert match in str(result.exception)
    assert not (tmp_path / "x").exists()  # nothing written


def test_missing_checkpoint_and_bad_attack_exit_2(checkpoints, tmp_path):
    result = run(["transfer-matrix", checkpoints[0], tmp_path / "missing"])
    assert isinstance(result.exception, UserError)
    proc = subprocess.run(
        [sys.executable, "-m", "robust_transfer.cli", "attack", str(checkpoints[0]),
         "--attack", "nope", "--out", str(tmp_path / "y")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown attack 'nope'; attacks: apgd-ce, apgd-dlr, apgd-t, bim, cw, deepfool, "
        "fab, fab-t, fgsm, lbfgs, pgd, square; cascades: autoattack, autoattack-fast"]


def test_unsupported_norm_is_refused_before_any_work(checkpoints, tmp_path):
    result = run(["attack", checkpoints[0], "--attack", "pgd,bim", "--norm", "l2",
                  "--out", tmp_path / "x"])
    assert isinstance(result.exception, UserError)
    assert "'bim' does not support norm 'l2'; it supports: linf" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_evaluate_is_the_attack_command(checkpoints, tmp_path):
    args = [checkpoints[1], "--attack", "fgsm", "--n", "16", "--gallery", "0"]
    outputs = [run([cmd, *args, "--out", tmp_path / cmd]) for cmd in ("attack", "evaluate")]
    assert [r.exit_code for r in outputs] == [0, 0], outputs[1].output
    tables = [(tmp_path / cmd / "robustness.csv").read_text() for cmd in ("attack", "evaluate")]
    assert tables[0] == tables[1]
    # defaults come from the checkpoint: its L2 training threat model at its eps (0.5)
    assert tables[0].splitlines()[1].startswith("0.5,l2,fgsm")


def test_transfer_matrix_needs_two_models_of_one_task(checkpoints, tmp_path):
    one = run(["transfer-matrix", checkpoints[0], "--out", tmp_path / "a"])
    assert isinstance(one.exception, UserError) and "two or more" in str(one.exception)
    model, card = train_source(SourceConfig(task="digits-5to9", train=TrainConfig(epochs=1)))
    other = save_checkpoint(model, tmp_path / "other-task", card)
    mixed = run(["transfer-matrix", checkpoints[0], other, "--out", tmp_path / "b"])
    assert isinstance(mixed.exception, UserError)
    assert "different tasks" in str(mixed.exception)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
