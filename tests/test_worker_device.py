"""The device a grid's jobs carry is the user's name ("auto"), resolved by the worker that
runs them (issue 17): a Ray worker on a GPU machine takes its GPU whatever the driver has."""

from __future__ import annotations

import pytest
import torch
import yaml

from robust_transfer.errors import UserError
from robust_transfer.transfer import grid
from robust_transfer.transfer.spec import parse_spec

SPEC = {
    "source": {"task": "synthetic-0to4", "epochs": 1, "attack_steps": 1},
    "sources": [{"eps": 0.0, "norm": "l2"}],
    "targets": ["synthetic-5to9"],
    "images_per_class": [1],
    "unfrozen_blocks": [0],
    "epochs": 1,
    "seeds": [0],
}


class _Stop(Exception):
    pass


@pytest.fixture
def worker_has_cuda(monkeypatch):
    """A worker whose machine (unlike this one, the driver) has CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_jobs_carry_the_device_unresolved(tmp_path):
    todo = grid.plan(parse_spec(SPEC), tmp_path, "auto")
    assert [j.device for j in todo.sources_to_train] == ["auto"]
    assert [j.device for j in todo.pending] == ["auto"]


def test_the_finetune_worker_resolves_auto_on_its_own_machine(tmp_path, monkeypatch,
                                                              worker_has_cuda):
    seen = []

    def record(source_dir, cfgs, device, *rest):
        seen.append(device)
        raise _Stop

    monkeypatch.setattr(grid, "finetune_many_from_checkpoint", record)
    todo = grid.plan(parse_spec(SPEC), tmp_path, "auto")
    with pytest.raises(_Stop):
        grid._finetune_batch_job(grid._FinetuneBatch(tuple(todo.pending)))
    assert seen == [torch.device("cuda")]


def test_the_source_worker_resolves_auto_on_its_own_machine(tmp_path, monkeypatch,
                                                            worker_has_cuda):
    seen = []

    def record(config, device, teacher=None):
        seen.append(device)
        raise _Stop

    monkeypatch.setattr(grid, "train_backdoor_source", record)
    (job,) = grid.plan(parse_spec(SPEC), tmp_path, "auto").sources_to_train
    with pytest.raises(_Stop):
        grid.train_source_job(job)
    assert seen == [torch.device("cuda")]


def test_a_cpu_worker_resolves_auto_to_cpu_and_refuses_absent_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert grid.worker_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device"):
        grid.worker_device("cuda")
    assert grid.worker_device("cuda:1") == torch.device("cuda", 1)  # an API torch device


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_bad_device_name_is_refused_at_the_edge(cli, tmp_path, executor):
    """Checked on the driver before any work, whichever executor would run the jobs."""
    spec_file, out = tmp_path / "spec.yaml", tmp_path / "out"
    spec_file.write_text(yaml.safe_dump(SPEC))
    code, _, err = cli("grid", spec_file, "--out", out, "--device", "gpu",
                       "--executor", executor)
    assert code == 2 and err.startswith("error: unknown device 'gpu'") and not out.exists()
