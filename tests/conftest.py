"""Shared fixtures: small, fast source checkpoints on the synthetic data."""

from __future__ import annotations

import os

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
    model, meta = tiny_source()
    return save_checkpoint(model, tmp_path_factory.mktemp("src") / "natural", meta)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; (exit code, stdout, stderr)."""

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return exit_info.value.code or 0, captured.out, captured.err

    return run
