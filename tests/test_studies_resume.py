"""Every study command, through the one runner (`transfer.runner`): killed with `kill -9`
mid-run and re-run into the same folder, it loses and duplicates no row, and its table
equals an uninterrupted run's; run with `--executor ray`, its table equals the local one.

A study command joins by one line in `CASES` (its command words, the columns that hold wall
times, which no two runs share, and whether the spec is its positional argument rather than
`--spec`) and a tiny spec at `tests/data/studies/<case>.yaml`, big enough to be killed
between its first and its last run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest

from robust_transfer.studies import load_study
from robust_transfer.transfer.results import PARTS, part_files, read_results

SPECS = Path(__file__).parent / "data" / "studies"


class Case(NamedTuple):
    command: tuple[str, ...]
    wall: tuple[str, ...] = ()  # columns of wall times, left out of the comparison
    positional: bool = False  # the spec is the command's argument, not --spec


# `grid` itself: tests/test_faults.py (kill -9, Ctrl-C) and tests/test_executor_ray.py.
CASES: dict[str, Case] = {
    "backdoor-transfer": Case(("backdoor", "transfer"), positional=True),
    "certify-transfer": Case(("certify-transfer",), positional=True),
    "bias-transfer": Case(("bias-transfer",)),
    "defend": Case(("defend",)),
    "influence": Case(("explain", "influence")),
    "backdoor-updates": Case(("backdoor", "updates")),
    "distill": Case(("distill",)),
    "watermark-removal": Case(("watermark", "remove"), ("seconds",)),
}


def _spec(name: str) -> Path:
    return SPECS / f"{name}.yaml"


def _argv(name: str, out: Path, *extra: str) -> list[str]:
    case = CASES[name]
    spec = [str(_spec(name))] if case.positional else ["--spec", str(_spec(name))]
    return [*case.command, *spec, "--out", str(out), "--device", "cpu", *extra]


def _table(name: str, out: Path) -> pd.DataFrame:
    study = load_study(_spec(name))
    df = read_results(out, study.required)
    wall = [c for c in CASES[name].wall if c in df.columns]
    keys = [c for c in ("run_id", "epoch", "step", "update") if c in df.columns]
    return (df.drop(columns=wall).sort_values(keys, kind="stable").reset_index(drop=True)
            [sorted(set(df.columns) - set(wall))])


@pytest.fixture(scope="module", params=sorted(CASES))
def reference(request, tmp_path_factory, cli_module):
    """(study name, its table from one uninterrupted in-process run)."""
    name = request.param
    out = tmp_path_factory.mktemp(name.replace("-", "_")) / "whole"
    code, _, err = cli_module(*_argv(name, out))
    assert code == 0, err
    return name, _table(name, out)


@pytest.fixture(scope="module")
def cli_module():
    """The CLI in-process (module scope: a `cli` for module fixtures); (exit code, out, err)."""
    from robust_transfer.cli import main

    def run(*args):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            return e.code or 0, "", ""
        return 0, "", ""

    return run


def _wait_for_first_part(proc: subprocess.Popen, out: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not part_files(out / PARTS):
        if proc.poll() is not None:
            pytest.fail(f"the study ended (exit {proc.returncode}) before it could be killed "
                        f"mid-run: {proc.communicate()[1][-2000:]}")
        assert time.time() < deadline, "timed out waiting for the first run"
        time.sleep(0.02)


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_table(reference, tmp_path, cli):
    name, whole = reference
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "robust_transfer.cli", *_argv(name, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for_first_part(proc, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    parts = len(part_files(out / PARTS))
    assert 0 < parts < whole.run_id.nunique(), "killed after the last run: make the spec bigger"
    code, stdout, err = cli(*_argv(name, out))
    assert code == 0, err
    assert f"{whole.run_id.nunique() - parts} " in stdout  # only the missing runs ran
    again = _table(name, out)
    # no row twice (a run's rows are told apart by its own columns: epoch, eps, k, ...)
    assert not again.duplicated().any()
    pd.testing.assert_frame_equal(again, whole)


def test_ray_executor_gives_the_local_table(reference, tmp_path, cli, ray_local):
    name, whole = reference
    code, _, err = cli(*_argv(name, tmp_path / "ray", "--executor", "ray", "--workers", "2"))
    assert code == 0, err
    pd.testing.assert_frame_equal(_table(name, tmp_path / "ray"), whole)
