"""Shared fixtures: small, fast source checkpoints on the synthetic data."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

from robust_transfer.cli import main
from robust_transfer.models import save_checkpoint
from robust_transfer.train import SourceConfig, TrainConfig, train_source

# Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting makes
# oversubscribed threads (parallel CLI subprocesses, grid workers) many times slower.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_source(eps: float = 0.0, task: str = "synthetic-0to4", epochs: int = 3):
    cfg = SourceConfig(task=task, eps=eps, norm="l2", attack_steps=2,
                       train=TrainConfig(epochs=epochs, batch_size=64))
    return train_source(cfg)


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory):
    """A naturally trained synthetic-0to4 source checkpoint directory."""
    model, card = tiny_source()
    return save_checkpoint(model, tmp_path_factory.mktemp("src") / "natural", card)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; (exit code, stdout, stderr)."""

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return exit_info.value.code or 0, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (starting Ray costs seconds): 2 CPUs, no
    dashboard, a small object store; executors find it initialised and leave it running."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install "
                              "robust_transfer[ray]; `make test` installs it)")
    # Ray's session files (logs, sockets, spilled objects) go to a folder of our own, removed
    # afterwards, instead of piling up under /tmp/ray with every test session.
    temp = tempfile.mkdtemp(prefix="ray-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 * 1024**2, configure_logging=False, _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
