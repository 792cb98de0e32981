"""The CLI as a user meets it: help, happy paths, and one-line errors with exit code 2."""

import subprocess
import sys
from dataclasses import dataclass

import pytest

from robust_transfer.cli import main


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process (as the console script does) and capture its output."""

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(exit_info.value.code or 0, captured.out, captured.err)

    return run


def test_help_lists_the_study_commands(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("train", "evaluate", "finetune", "grid", "report", "demo"):
        assert command in result.stdout


def test_train_evaluate_finetune(cli, tmp_path):
    ck = tmp_path / "src"
    result = cli("train", "--task", "synthetic-0to4", "--eps", "0.5", "--epochs", "2",
                 "--attack-steps", "2", "--out", ck)
    assert result.returncode == 0, result.stderr
    assert (ck / "weights.safetensors").is_file() and "clean accuracy" in result.stdout
    result = cli("evaluate", ck, "--eps", "0", "0.25", "0.5", "--norm", "l2", "--n", "20",
                 "--gallery", "0", "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    assert "synthetic-0to4" in result.stdout
    assert (tmp_path / "eval" / "robustness.csv").read_text().count("worst case") == 3
    result = cli("finetune", ck, "--task", "synthetic-5to9", "--images-per-class", "3",
                 "--unfrozen-blocks", "1", "--epochs", "2", "--out", tmp_path / "ft")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ft" / "meta.json").is_file() and "test_accuracy" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["train", "--task", "mnist-7", "--out", "{tmp}/x"], "unknown task 'mnist-7'"),
    (["train", "--arch", "resnet", "--out", "{tmp}/x"], "unknown arch 'resnet'"),
    (["train", "--norm", "l3", "--out", "{tmp}/x"], "unknown norm 'l3'"),
    (["train", "--eps", "-0.5", "--out", "{tmp}/x"], "eps must be"),
    (["evaluate", "{tmp}/missing"], "no checkpoint"),
    (["finetune", "{src}", "--task", "synthetic-5to9", "--images-per-class", "500"],
     "more than class"),
    (["finetune", "{src}", "--task", "synthetic-5to9", "--unfrozen-blocks", "9"],
     "unfrozen blocks must be 0..3"),
    (["grid", "{tmp}/nospec.yaml", "--out", "{tmp}/g"], "does not exist"),
    (["report", "{tmp}/noresults"], "no results"),
    (["train", "--device", "tpu", "--out", "{tmp}/x"], "unknown device 'tpu'"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(cli, tmp_path, source_dir, args, message):
    args = [a.format(tmp=tmp_path, src=source_dir) for a in args]
    result = cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "g").exists()


def test_console_script_exits_2_and_debug_shows_the_traceback():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "robust_transfer.cli", *args],
                              capture_output=True, text=True)

    plain = run("train", "--task", "mnist-7", "--out", "unused")
    assert plain.returncode == 2 and plain.stderr.startswith("error: unknown task")
    debug = run("--debug", "train", "--task", "mnist-7", "--out", "unused")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
