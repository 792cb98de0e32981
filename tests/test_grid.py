import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from robust_transfer.errors import UserError
from robust_transfer.report.study import make_report
from robust_transfer.transfer.grid import plan, run_grid
from robust_transfer.transfer.results import (
    REQUIRED_COLUMNS,
    append_run,
    done_run_ids,
    read_results,
)
from robust_transfer.transfer.spec import expand, load_spec, parse_spec

SPEC = {
    "source": {"task": "synthetic-0to4", "epochs": 2, "attack_steps": 2},
    "sources": [{"eps": 0.0, "norm": "l2"}, {"eps": 0.5, "norm": "l2"}],
    "targets": ["synthetic-5to9"],
    "images_per_class": [1, 3, "all"],
    "unfrozen_blocks": [0, "all"],
    "epochs": 3,
    "seeds": [0, 1, 2],
}


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "robust_transfer.cli", *map(str, args)],
                          capture_output=True, text=True, **kwargs)


def test_spec_expands_to_every_combination():
    runs = expand(parse_spec(SPEC))
    assert len(runs) == 2 * 3 * 2 * 3
    assert len({r.run_id for r in runs}) == len(runs)
    assert len({r.source_id for r in runs}) == 2
    runs = expand(parse_spec({**SPEC, "epochs": [2, 3], "lr": [0.1, 0.01]}))
    assert len(runs) == 2 * 3 * 2 * 3 * 2 * 2
    assert {r.finetune.epochs for r in runs} == {2, 3}


def test_report_makes_one_figure_set_per_number_of_epochs(tmp_path):
    spec = parse_spec({**SPEC, "images_per_class": [1, 3], "unfrozen_blocks": [0],
                       "epochs": [2, 3], "seeds": [0, 1]})
    report = make_report(run_grid(spec, tmp_path / "g"), tmp_path / "rep")
    assert sorted(p.name for p in report.figures) == [
        "fig1_accuracy_vs_images_epochs2.png", "fig1_accuracy_vs_images_epochs3.png",
        "fig2_accuracy_vs_epochs_k1_epochs2.png", "fig2_accuracy_vs_epochs_k1_epochs3.png"]
    summary = report.summary.read_text()
    assert "(lr 0.1, 2 epochs)" in summary and "(lr 0.1, 3 epochs)" in summary


@pytest.mark.parametrize("bad,match", [
    ({"seedz": [0]}, "unknown key 'seedz'"),
    ({"sources": [{"eps": -1}]}, "eps must be >= 0"),
    ({"sources": [{"eps": 0.5, "norm": "l3"}]}, "unknown norm 'l3'"),
    ({"targets": ["digits-5to10"]}, "unknown task"),
    ({"images_per_class": [0]}, "positive integer"),
    ({"source": {"arch": "vgg"}}, "unknown arch"),
    ({"source": {"epochz": 1}}, "unknown key 'epochz' in spec.source"),
    ({"epochs": "many"}, "must be a number"),
])
def test_bad_specs_name_the_bad_value(bad, match):
    with pytest.raises(UserError, match=match):
        parse_spec({**SPEC, **bad})


def test_invalid_yaml_is_a_user_error(tmp_path):
    (tmp_path / "s.yaml").write_text("sources: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_spec(tmp_path / "s.yaml")


def test_grid_and_report_end_to_end(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    result = cli("grid", spec_file, "--out", tmp_path / "g", "--workers", 2)
    assert result.returncode == 0, result.stderr
    df = read_results(tmp_path / "g")
    assert len(df) == 36 * 3 and df.groupby("run_id").size().eq(3).all()
    for column in ["source_eps", "source_norm", "target_task", "images_per_class",
                   "unfrozen_blocks", "epoch", "seed", "lr", "test_accuracy"]:
        assert column in df.columns
    result = cli("report", tmp_path / "g", "--out", tmp_path / "rep")
    assert result.returncode == 0, result.stderr
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert pngs == ["fig1_accuracy_vs_images.png", "fig2_accuracy_vs_epochs_k1.png"]
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "natural" in summary and "L2 ε=0.5" in summary and "Δ L2 ε=0.5" in summary


def test_rerun_is_a_no_op_and_results_match_a_fresh_run(tmp_path):
    spec = parse_spec({**SPEC, "seeds": [0], "images_per_class": [1]})
    first = pd.read_parquet(run_grid(spec, tmp_path / "a"))
    calls = []
    run_grid(spec, tmp_path / "a", on_run_done=calls.append)
    assert calls == []
    fresh = pd.read_parquet(run_grid(spec, tmp_path / "b"))
    key = ["run_id", "epoch"]
    pd.testing.assert_frame_equal(first.sort_values(key).reset_index(drop=True),
                                  fresh.sort_values(key).reset_index(drop=True))


def test_resume_after_kill_9_gives_exactly_the_expected_rows(tmp_path):
    spec = {**SPEC, "epochs": 12}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "g"
    proc = subprocess.Popen([sys.executable, "-m", "robust_transfer.cli", "grid", str(spec_file),
                             "--out", str(out), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(done_run_ids(out)) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(done_run_ids(out))
    expected = {r.run_id for r in expand(parse_spec(spec))}
    assert 3 <= done_before < len(expected), "the kill should land mid-grid"
    assert len(plan(parse_spec(spec), out).pending) == len(expected) - done_before
    result = cli("grid", spec_file, "--out", out, "--workers", 1)
    assert result.returncode == 0, result.stderr
    df = read_results(out)
    assert set(df.run_id) == expected
    assert len(df) == len(expected) * 12
    assert not df.duplicated(["run_id", "epoch"]).any()


def test_a_temporary_file_left_by_a_kill_is_not_a_run(tmp_path):
    append_run(tmp_path, "abc", [{c: 1 for c in REQUIRED_COLUMNS} | {"run_id": "abc"}])
    (tmp_path / "results" / ".def.k3j2.parquet").write_bytes(b"PAR1 half-written")
    assert done_run_ids(tmp_path) == {"abc"}


def test_report_rejects_a_table_that_is_not_ours(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(UserError, match="not a robust_transfer results table"):
        make_report(tmp_path / "x.parquet", tmp_path / "rep")
    (tmp_path / "y.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a Parquet table"):
        read_results(tmp_path / "y.parquet")
    assert not (tmp_path / "rep").exists()


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_workers_exit_when_the_grid_is_killed(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**SPEC, "epochs": 30}))
    proc = subprocess.Popen([sys.executable, "-m", "robust_transfer.cli", "grid", str(spec_file),
                             "--out", str(tmp_path / "g"), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, []
    while time.time() < deadline and len(workers) < 2:
        workers = [p for p in _children(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        time.sleep(0.1)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.2)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    assert alive == []
