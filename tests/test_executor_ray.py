"""The Ray executor: same table as the local executor, resumable, a clear error without Ray.

One local Ray (`conftest.ray_local`: 2 CPUs, no dashboard, small object store) serves every
test that needs one: starting Ray costs seconds, so the executors under test find it
initialised and leave it running.
"""

import builtins
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from robust_transfer.cli import app
from robust_transfer.errors import UserError
from robust_transfer.transfer.executors import LocalExecutor, make_executor
from robust_transfer.transfer.grid import run_grid
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.spec import expand, parse_spec

SPEC = {
    "source": {"task": "synthetic-0to4", "epochs": 2, "attack_steps": 2},
    "sources": [{"eps": 0.0}, {"eps": 0.5}],
    "targets": ["synthetic-5to9"],
    "images_per_class": [1, 3],
    "unfrozen_blocks": [0, 1],
    "epochs": 2,
    "seeds": [0],
}


def _sorted(path) -> pd.DataFrame:
    df = read_results(path)
    return df.sort_values(["run_id", "epoch"]).reset_index(drop=True)[sorted(df.columns)]


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    with LocalExecutor(2) as pool:
        return _sorted(run_grid(parse_spec(SPEC), out, executor=pool))


def test_ray_table_equals_local_table_and_resumes(ray_local, local_table, tmp_path):
    spec = parse_spec(SPEC)
    partial = parse_spec({**SPEC, "images_per_class": [1]})
    first = []
    run_grid(partial, tmp_path, executor=make_executor("ray", workers=2),
             on_run_done=first.append)
    assert len(first) == 4
    # A re-run of the whole spec (as after a killed driver) runs only the missing runs.
    second = []
    table = run_grid(spec, tmp_path, executor=make_executor("ray", workers=2),
                     on_run_done=second.append)
    assert not set(first) & set(second)
    assert set(first) | set(second) == {r.run_id for r in expand(spec)}
    assert ray_local.is_initialized()  # a Ray that was already running is left running
    pd.testing.assert_frame_equal(_sorted(table), local_table)


def test_cli_grid_with_ray_executor(ray_local, local_table, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        "source: {task: synthetic-0to4, epochs: 2, attack_steps: 2}\n"
        "sources: [{eps: 0.0}, {eps: 0.5}]\ntargets: [synthetic-5to9]\n"
        "images_per_class: [1, 3]\nunfrozen_blocks: [0, 1]\nepochs: 2\nseeds: [0]\n")
    result = CliRunner().invoke(app, ["grid", str(spec_file), "--out", str(tmp_path / "g"),
                                      "--executor", "ray", "--workers", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(_sorted(tmp_path / "g"), local_table)


def test_a_failing_ray_run_raises_its_user_error(ray_local):
    def bad(item):
        raise UserError(f"bad item {item}")

    with make_executor("ray", workers=2) as pool, pytest.raises(UserError, match="bad item"):
        list(pool.map_unordered(bad, [1, 2]))


def test_missing_ray_is_one_line_saying_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UserError, match=r"pip install robust_transfer\[ray\]"):
        make_executor("ray")
    with pytest.raises(UserError, match="--address is for the Ray executor"):
        make_executor("local", address="auto")
    with pytest.raises(UserError, match="unknown executor 'dask'"):
        make_executor("dask")


def test_tasks_ask_for_a_gpu_fraction_only_where_gpus_are(ray_local, monkeypatch):
    assert make_executor("ray", tasks_per_gpu=4).gpus_per_task() == 0  # this Ray: CPUs only
    monkeypatch.setattr(ray_local, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    assert make_executor("ray", tasks_per_gpu=4).gpus_per_task() == 0.25
    assert make_executor("ray", tasks_per_gpu=4, use_gpus=False).gpus_per_task() == 0
    with pytest.raises(UserError, match="tasks per GPU must be >= 1"):
        make_executor("ray", tasks_per_gpu=0)
