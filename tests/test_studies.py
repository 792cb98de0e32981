"""The studies layer's seams: a spec names its study (`study:`; none: a grid), `--save-spec`
writes what `run` and `--spec` read back, and `report DIR` finds the study in the folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from robust_transfer.cli import studies as studies_cli
from robust_transfer.errors import UserError
from robust_transfer.report.studies import make_study_report, study_of
from robust_transfer.studies import GRID, STUDIES, load_study, recorded_study, study_from_dict
from robust_transfer.transfer.grid import GridStudy, backdoor_spec_path
from robust_transfer.transfer.runner import spec_text
from robust_transfer.transfer.spec import load_spec


class _Stop(Exception):
    pass


def test_a_spec_without_study_is_a_grid_and_an_unknown_study_is_named():
    study = load_study(backdoor_spec_path())
    assert isinstance(study, GridStudy) and study.name == GRID
    assert study.spec == load_spec(backdoor_spec_path())
    with pytest.raises(UserError, match=r"unknown study 'nope'; allowed: .*grid"):
        study_from_dict({"study": "nope"})
    with pytest.raises(UserError, match="must be a YAML mapping"):
        study_from_dict([1, 2])
    assert GRID in STUDIES


def test_save_spec_writes_the_spec_that_run_reads_back_and_nothing_else(tmp_path, cli,
                                                                         monkeypatch):
    saved = tmp_path / "backdoor.yaml"
    code, _, err = cli("backdoor", "transfer", "--save-spec", saved)
    assert code == 0, err
    assert list(tmp_path.iterdir()) == [saved]  # no --out needed, no study folder made
    study = load_study(saved)
    assert spec_text(study) == saved.read_text()
    assert study.spec == load_spec(backdoor_spec_path())
    ran = []

    def record(s, *_args, **_kwargs):
        ran.append(s)
        raise _Stop

    monkeypatch.setattr(studies_cli, "run_study", record)
    with pytest.raises(_Stop):
        cli("run", saved, "--out", tmp_path / "out", "--device", "cpu")
    assert len(ran) == 1 and ran[0].spec == study.spec


def test_missing_out_and_a_spec_of_another_study_are_one_line_errors(tmp_path, cli):
    code, _, err = cli("backdoor", "transfer")
    assert code == 2 and "missing --out DIR" in err
    spec = tmp_path / "other.yaml"
    spec.write_text(backdoor_spec_path().read_text())
    with pytest.raises(UserError, match="is a grid spec, not a distill spec; run it with"):
        studies_cli.StudyRun(spec=spec).study("distill", lambda: None)


def test_report_recognises_the_study_a_folder_records(tmp_path):
    assert study_of(tmp_path) == GRID and recorded_study(tmp_path) is None
    (tmp_path / "spec.yaml").write_text("name: demo\nsources: []\n")
    assert study_of(tmp_path) == GRID
    (tmp_path / "spec.yaml").write_text("study: nope\n")
    assert study_of(tmp_path) == "nope"
    with pytest.raises(UserError, match="unknown study 'nope'"):
        make_study_report(tmp_path, tmp_path / "report")


def test_a_study_setting_beside_spec_is_refused_before_any_work(tmp_path, cli):
    spec = "tests/data/studies/bias-transfer.yaml"
    code, _, err = cli("bias-transfer", "--spec", spec, "--seeds", "3", "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--seeds sets the study, which --spec" in err and not (tmp_path / "o").exists()
    code, _, err = cli("bias-transfer", "--spec", spec, "--workers", "2", "--device", "cpu",
                       "--save-spec", tmp_path / "again.yaml")  # how and where it runs: fine
    assert code == 0, err
    assert load_study(tmp_path / "again.yaml") == load_study(spec)


@pytest.mark.parametrize("command", [["bias-transfer"], ["defend"], ["distill"],
                                     ["explain", "influence"], ["watermark", "remove"],
                                     ["backdoor", "updates"]])
def test_every_study_command_passes_executor_options_to_the_executor(tmp_path, cli, command):
    case = "influence" if command == ["explain", "influence"] else \
        {"watermark": "watermark-removal", "backdoor": "backdoor-updates"}.get(command[0],
                                                                                command[0])
    spec = f"tests/data/studies/{case}.yaml"
    code, _, err = cli(*command, "--spec", spec, "--executor-option", "nope=1", "--out",
                       tmp_path / "o", "--device", "cpu")
    assert code == 2 and "unknown option(s) nope for executor 'local'" in err, err
    assert not (tmp_path / "o").exists()


def test_study_options_hand_the_shared_options_to_the_command_as_one_object():
    app, seen = typer.Typer(), []

    @app.command()
    @studies_cli.study_options(workers=2)
    def command(out: Path = typer.Option(None, "--out"), *, run: studies_cli.StudyRun) -> None:
        seen.append((out, run))

    result = CliRunner().invoke(app, ["--out", "o", "--executor-option", "a=1",
                                      "--executor-option", "b=2", "--save-spec", "s.yaml"])
    assert result.exit_code == 0, result.output
    assert seen == [(Path("o"), studies_cli.StudyRun(
        save_spec=Path("s.yaml"), workers=2, executor_options=("a=1", "b=2")))]
    help_text = CliRunner().invoke(app, ["--help"]).output
    for flag in ("--spec", "--save-spec", "--workers", "--executor", "--address",
                 "--executor-option"):
        assert flag in help_text

    with pytest.raises(TypeError, match="workers is added by the decorator"):
        @studies_cli.study_options()
        def clash(workers: int = 1, *, run: studies_cli.StudyRun) -> None:
            pass
