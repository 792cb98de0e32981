"""The CLI's input edges: every input error is one `error:` line with exit code 2, outputs are
checked before any work starts, checkpoints are not replaced silently, help reads well, and
Ctrl-C is one line (exit 130) that says how to resume."""

from __future__ import annotations

import pytest
import yaml

from robust_transfer.cli import study as study_cli
from robust_transfer.models.checkpoint import META, WEIGHTS

SPEC = {
    "source": {"task": "synthetic-0to4", "epochs": 1, "attack_steps": 1},
    "sources": [{"eps": 0.0, "norm": "l2"}],
    "targets": ["synthetic-5to9"],
    "images_per_class": [1],
    "unfrozen_blocks": [0],
    "epochs": 1,
    "seeds": [0],
}


@pytest.fixture
def no_training(monkeypatch):
    """Make any training or grid work fail the test: errors must come before it."""

    def forbidden(*_args, **_kwargs):
        raise AssertionError("work started before the input was validated")

    from robust_transfer.cli import studies as studies_cli

    for name in ("train_source", "finetune_from_checkpoint", "make_report"):
        monkeypatch.setattr(study_cli, name, forbidden)
    monkeypatch.setattr(studies_cli, "run_study", forbidden)  # every study command's runs


def one_error_line(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args,needles", [
    (["train", "--eps", "abc", "--out", "{tmp}/x"], ["Invalid value for '--eps'"]),
    (["train"], ["Missing option '--out'"]),
    (["grid", "{tmp}/spec.yaml"], ["Missing option '--out'"]),
    (["report"], ["Missing argument"]),
    (["train", "--epochs", "1.5", "--out", "{tmp}/x"], ["'--epochs'"]),
    (["train", "--bogus", "--out", "{tmp}/x"], ["No such option: --bogus"]),
    (["trian"], ["No such command 'trian'"]),
])
def test_parse_errors_are_one_line_exit_2(cli, tmp_path, args, needles):
    code, _, err = cli(*(a.format(tmp=tmp_path) for a in args))
    line = one_error_line(code, err, *needles)
    assert "╭" not in line and "Usage:" not in err


def test_help_still_works_and_exits_0(cli):
    for args in ([], ["--help"], ["grid", "--help"]):
        code, out, err = cli(*args)
        assert code == 0 and "Usage" in out and not err.strip()


@pytest.mark.parametrize("command", ["train", "finetune", "grid", "report", "demo"])
def test_flags_read_as_flags_in_help(cli, command):
    _, out, _ = cli(command, "--help")
    assert "<bool>" not in out
    _, root, _ = cli("--help")
    assert "<bool>" not in root and "--debug" in root


def test_train_help_lists_every_norm_it_accepts(cli):
    _, out, _ = cli("train", "--help")
    assert "linf | l2 | l1" in " ".join(out.replace("│", " ").split())
    assert "--overwrite" in out


def _existing_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("args", [
    ["train", "--out", "{file}"],
    ["train", "--out", "{file}/sub"],
    ["finetune", "{src}", "--task", "synthetic-5to9", "--out", "{file}"],
    ["grid", "{spec}", "--out", "{file}"],
    ["report", "{tmp}", "--out", "{file}"],
    ["demo", "--out", "{file}"],
])
def test_an_out_that_is_a_file_is_refused_before_any_work(cli, tmp_path, source_dir,
                                                           no_training, args):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    file = _existing_file(tmp_path)
    code, _, err = cli(*(a.format(file=file, src=source_dir, spec=spec, tmp=tmp_path)
                         for a in args))
    one_error_line(code, err, "--out", "not a directory")
    assert file.read_text() == "not a directory"


def test_a_binary_spec_is_one_line(cli, tmp_path, no_training):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(bytes(range(256)) * 4)
    code, _, err = cli("grid", spec, "--out", tmp_path / "g")
    one_error_line(code, err, "not a text")
    assert not (tmp_path / "g").exists()


def test_a_spec_that_is_not_a_mapping_is_one_line(cli, tmp_path, no_training):
    spec = tmp_path / "spec.yaml"
    spec.write_text("- 1\n- 2\n")
    code, _, err = cli("grid", spec, "--out", tmp_path / "g")
    one_error_line(code, err, "must hold a YAML mapping")


@pytest.mark.parametrize("eps", ["inf", "nan", "-inf"])
def test_non_finite_eps_is_one_line(cli, tmp_path, no_training, eps):
    code, _, err = cli("train", "--eps", eps, "--out", tmp_path / "x")
    one_error_line(code, err, "eps")
    assert not (tmp_path / "x").exists()


def _fake_checkpoint(directory):
    directory.mkdir()
    (directory / WEIGHTS).write_bytes(b"old weights")
    (directory / META).write_text("{}")
    return directory


def test_train_refuses_to_replace_a_checkpoint_before_training(cli, tmp_path, no_training):
    ck = _fake_checkpoint(tmp_path / "ck")
    code, _, err = cli("train", "--task", "synthetic-0to4", "--out", ck)
    one_error_line(code, err, "already holds a checkpoint", "--overwrite")
    assert (ck / WEIGHTS).read_bytes() == b"old weights"


def test_finetune_refuses_to_replace_a_checkpoint_before_fine_tuning(cli, tmp_path,
                                                                      source_dir, no_training):
    ck = _fake_checkpoint(tmp_path / "ft")
    code, _, err = cli("finetune", source_dir, "--task", "synthetic-5to9", "--out", ck)
    one_error_line(code, err, "already holds a checkpoint")
    assert (ck / WEIGHTS).read_bytes() == b"old weights"


def test_train_overwrite_replaces_the_checkpoint(cli, tmp_path):
    ck = _fake_checkpoint(tmp_path / "ck")
    code, out, err = cli("train", "--task", "synthetic-0to4", "--epochs", "1", "--out", ck,
                         "--overwrite")
    assert code == 0, err
    assert (ck / WEIGHTS).read_bytes() != b"old weights" and "clean accuracy" in out


def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command,resumable", [("grid", True), ("train", False)])
def test_ctrl_c_is_one_line_exit_130(cli, tmp_path, monkeypatch, command, resumable):
    from robust_transfer.cli import studies as studies_cli

    monkeypatch.setattr(studies_cli, "run_study", _interrupt)
    monkeypatch.setattr(study_cli, "train_source", _interrupt)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    args = {"grid": ["grid", spec, "--out", tmp_path / "g", "--workers", "1"],
            "train": ["train", "--task", "synthetic-0to4", "--out", tmp_path / "x"]}[command]
    code, _, err = cli(*args)
    lines = [line for line in err.splitlines() if line.strip() and "━" not in line]
    assert code == 130
    assert lines[-1].startswith("interrupted") and "Traceback" not in err
    assert ("run the same command again to resume" in lines[-1]) == resumable


def test_grid_prints_the_current_spec_runs_and_takes_a_device(cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "seeds": [0, 1]}))
    out = tmp_path / "g"
    code, stdout, err = cli("grid", spec, "--out", out, "--workers", "1", "--device", "cpu")
    assert code == 0, err
    assert "(2 runs)" in stdout  # a result: on stdout, progress and notes on stderr
    spec.write_text(yaml.safe_dump({**SPEC, "seeds": [1]}))
    code, stdout, err = cli("grid", spec, "--out", out, "--workers", "1", "--device", "cpu")
    assert code == 0, err
    assert "(1 run)" in stdout and "another spec" in " ".join(err.split())
