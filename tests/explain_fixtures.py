"""Shared, cached checkpoints for the explain tests (import explicitly; not a conftest).

Tiny digits models: a natural and an L2-robust source on digits 0-4 (2 epochs each) and
their head-only fine-tunes on 10 images per class of digits 5-9. Built once per test
session in a temporary directory (module-level cache, so every test module shares them).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pandas as pd

from robust_transfer.models import save_checkpoint
from robust_transfer.studies.influence import InfluenceStudy
from robust_transfer.train import SourceConfig, TrainConfig, train_source
from robust_transfer.transfer import FinetuneConfig
from robust_transfer.transfer.results import read_results
from robust_transfer.transfer.run import finetune_from_checkpoint
from robust_transfer.transfer.runner import run_study

FINETUNE = FinetuneConfig(target_task="digits-5to9", images_per_class=10, unfrozen_blocks=1,
                          epochs=8, lr=0.05, seed=0)


@dataclass(frozen=True)
class Checkpoints:
    root: Path
    natural: Path
    robust: Path
    ft_natural: Path
    ft_robust: Path


@cache
def checkpoints() -> Checkpoints:
    root = Path(tempfile.mkdtemp(prefix="explain-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    paths = {}
    for name, eps in (("natural", 0.0), ("robust", 0.5)):
        cfg = SourceConfig(task="digits-0to4", eps=eps, norm="l2", attack_steps=2,
                           train=TrainConfig(epochs=2, batch_size=64))
        model, card = train_source(cfg)
        paths[name] = save_checkpoint(model, root / name, card)
        paths[f"ft_{name}"] = root / f"ft_{name}"
        finetune_from_checkpoint(paths[name], FINETUNE, paths[f"ft_{name}"])
    return Checkpoints(root, **paths)


def study_results(out: Path, *paths: Path, **options) -> pd.DataFrame:
    """The results table of the influence study of `paths` (options: `InfluenceStudy`'s)
    run into `out` (the Python API of Figs. 5-6)."""
    run_study(InfluenceStudy(tuple(paths), **options), out)
    return read_results(out, InfluenceStudy.required)
