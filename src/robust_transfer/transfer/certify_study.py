"""The certify-transfer study's source side: certificates of the grid's source models on their
own task, beside the fine-tuned models' (`transfer.certify_eval`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from robust_transfer.atomic import atomic_write_text
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint
from robust_transfer.models.runtime import resolve_device
from robust_transfer.transfer.certify_eval import certify_columns, task_test_images
from robust_transfer.transfer.grid import SOURCES
from robust_transfer.transfer.run import source_columns
from robust_transfer.transfer.spec import GridSpec, content_id, source_configs, source_id


def certify_spec_path() -> Path:
    """The certify-transfer spec shipped inside the package (`certify-transfer`)."""
    return Path(__file__).resolve().parent.parent / "specs" / "certify.yaml"


def certify_sources(spec: GridSpec, out: str | Path, device: str = "cpu") -> pd.DataFrame:
    """One row per source model of the grid in `out` (trained by `run_grid`): its columns
    (`transfer.run.source_columns`) and the certification columns on its own task's test
    images (seed 0). Cached per source and certify settings in the source's directory.
    `device`: auto | cpu | cuda."""
    if spec.certify is None:
        raise UserError("the spec has no certify: section")
    key = content_id(spec.certify.to_dict(), 8)
    dev = resolve_device(device)
    rows = []
    for cfg in source_configs(spec):
        directory = Path(out) / SOURCES / source_id(cfg)
        cache = directory / f"certify-{key}.json"
        if cache.is_file():
            rows.append(json.loads(cache.read_text()))
            continue
        model, card = load_checkpoint(directory, dev)
        x, y = task_test_images(model, cfg.task if card.task is None else card.task)
        row = {**source_columns(card), **certify_columns(model, x, y, spec.certify)}
        atomic_write_text(cache, json.dumps(row))
        rows.append(row)
    return pd.DataFrame(rows)
