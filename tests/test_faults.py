"""The results store under faults, through the CLI as a user meets them (issue 21): kill -9
during source training and during fine-tunes, Ctrl-C, a second writer, a reader racing the
writer, corrupt parts. After each, the table is exactly the uninterrupted grid's: no lost,
duplicated or foreign row, the same bits (sources' weights and every number).

The spec has fewer than `grid.MIN_BATCH` runs per fine-tuning shape, so every run takes the
per-run path however many are pending, and equality is exact.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from robust_transfer.models.checkpoint import META, WEIGHTS, file_sha256
from robust_transfer.transfer.grid import run_grid
from robust_transfer.transfer.results import LOCK, MANIFEST, PARTS, part_files, read_results
from robust_transfer.transfer.runner import SOURCES, SPEC
from robust_transfer.transfer.spec import expand, parse_spec

SPEC_DICT = {
    "source": {"task": "synthetic-0to4", "epochs": 2, "attack_steps": 1},
    # natural trains faster than PGD: a kill after the first source lands between the two
    "sources": [{"eps": 0.0}, {"eps": 0.5}],
    "targets": ["synthetic-5to9"],
    "images_per_class": [1, 3],
    "unfrozen_blocks": [0],
    "epochs": 2,
    "seeds": [0, 1],
}
RUNS = {r.run_id for r in expand(parse_spec(SPEC_DICT))}
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and flock")


def _table(out: Path) -> pd.DataFrame:
    df = read_results(out)
    return df.sort_values(["run_id", "epoch"]).reset_index(drop=True)[sorted(df.columns)]


def _weights(out: Path) -> dict[str, str]:
    return {d.name: file_sha256(d / WEIGHTS) for d in sorted((out / SOURCES).iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted grid, run in this process (one worker)."""
    out = tmp_path_factory.mktemp("reference")
    run_grid(parse_spec(SPEC_DICT), out)
    return out


@pytest.fixture
def spec_file(tmp_path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC_DICT))
    return path


def _grid(spec: Path, out: Path, workers: int, threads: int = 1) -> subprocess.Popen:
    """`robust-transfer grid` in its own session (a Ctrl-C reaches its process group, as from
    a terminal); `threads`: the intra-op threads the process starts with."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(
        [sys.executable, "-m", "robust_transfer.cli", "grid", str(spec), "--out", str(out),
         "--workers", str(workers), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"grid ended (exit {proc.returncode}) before the fault: "
                        f"{proc.communicate()[1][-2000:]}")
        assert time.time() < deadline, "timed out waiting for the grid"
        time.sleep(0.02)


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # the main process only: workers must notice by themselves
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def _finish(spec: Path, out: Path, workers: int = 1, threads: int = 1) -> str:
    proc = _grid(spec, out, workers, threads)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout


def _no_temp_files(out: Path) -> None:
    left = [p for p in out.rglob(".*") if p.name != LOCK]
    assert left == [], left


def _sources_done(out: Path) -> int:
    return len(list((out / SOURCES).glob(f"*/{META}")))


def _parts(out: Path) -> int:
    return len(part_files(out / PARTS))


def test_kill_during_sources_then_ctrl_c_during_finetunes_resume_bit_identical(
        reference, spec_file, tmp_path):
    """kill -9 with one source trained, resume on another thread count, Ctrl-C during the
    fine-tunes, resume again: the weights and the table are the uninterrupted grid's."""
    out = tmp_path / "g"
    proc = _grid(spec_file, out, workers=1)
    _wait_for(lambda: _sources_done(out) >= 1, proc)
    _kill9(proc)
    assert _sources_done(out) == 1 and _parts(out) == 0
    # The resumed grid has one source left, trained in the main process (a pool of workers
    # does not start for one item): started with 2 threads, it must still train on
    # RUN_THREADS, as the uninterrupted grid did (it used to take all the process's threads).
    proc = _grid(spec_file, out, workers=1, threads=2)
    _wait_for(lambda: _parts(out) >= 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip() and "━" not in line]
    assert proc.returncode == 130, stderr
    assert lines[-1].startswith("interrupted") and "resume" in lines[-1]
    assert "Traceback" not in stderr
    assert _weights(out) == _weights(reference)
    stdout = _finish(spec_file, out, threads=2)
    assert f"({len(RUNS)} runs)" in stdout
    _no_temp_files(out)
    assert {p.stem for p in part_files(out / PARTS)} == RUNS
    pd.testing.assert_frame_equal(_table(out), _table(reference))
    assert _weights(out) == _weights(reference)


def test_second_writer_refused_reader_never_sees_half_a_write_kill9_leaves_no_lock(
        reference, spec_file, tmp_path, cli):
    """While a grid writes: a second grid into the same --out (same spec, or another) is one
    line naming the folder and the holder's pid, exit 2, nothing touched; a reader sees only
    whole runs of the spec. A kill -9 then leaves no stale lock: the re-run finishes."""
    out = tmp_path / "g"
    proc = _grid(spec_file, out, workers=1)
    _wait_for(lambda: (out / MANIFEST).is_file(), proc)
    assert (out / LOCK).read_text().strip() == str(proc.pid)
    spec_before, manifest_before = (out / SPEC).read_text(), (out / MANIFEST).read_text()
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**SPEC_DICT, "seeds": [7]}))
    for spec in (spec_file, other):
        code, stdout, err = cli("grid", spec, "--out", out, "--workers", "1")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith("error: ") and str(out) in lines[0]
        assert f"pid {proc.pid}" in lines[0] and stdout == ""
    assert (out / SPEC).read_text() == spec_before
    assert (out / MANIFEST).read_text() == manifest_before
    seen = set()
    while _parts(out) < 3:  # a reader racing the writer
        assert proc.poll() is None, proc.communicate()[1]
        try:
            df = read_results(out)
        except Exception as e:  # only "nothing finished yet" is allowed
            assert str(e).startswith("no results in"), e
            continue
        rows = df.groupby("run_id").size()
        assert set(rows.index) <= RUNS and (rows == SPEC_DICT["epochs"]).all()
        seen.add(len(rows))
    assert seen  # the reader did see a partial table
    _kill9(proc)
    assert 0 < _parts(out) < len(RUNS)
    stdout = _finish(spec_file, out)
    assert f"({len(RUNS)} runs)" in stdout
    _no_temp_files(out)
    pd.testing.assert_frame_equal(_table(out), _table(reference))
    assert not (out / LOCK).exists()  # released on a clean exit


def _corrupt(reference: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    out = tmp_path / "g"
    shutil.copytree(reference, out)
    truncated, overwritten = part_files(out / PARTS)[:2]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    data = bytearray(overwritten.read_bytes())
    middle = len(data) // 3  # inside the column data, far from the footer
    data[middle : middle + 16] = os.urandom(16)
    overwritten.write_bytes(bytes(data))
    return out, [truncated, overwritten]


def test_a_corrupt_part_is_named_by_report_and_rerun_by_grid(reference, spec_file, tmp_path,
                                                              cli):
    out, corrupt = _corrupt(reference, tmp_path)
    code, _, err = cli("report", out, "--out", tmp_path / "rep")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "corrupt results part" in lines[0], err
    assert any(str(p) in lines[0] for p in corrupt)
    assert not (tmp_path / "rep").exists()
    code, stdout, err = cli("grid", spec_file, "--out", out, "--workers", "1")
    assert code == 0, err
    for part in corrupt:
        assert str(part) in " ".join(err.split())
    assert f"{len(corrupt)} fine-tunes in" in stdout  # exactly the corrupt parts' runs
    pd.testing.assert_frame_equal(_table(out), _table(reference))
