"""One fine-tune from a source checkpoint: the code path shared by `finetune` and `grid`."""

from __future__ import annotations

from pathlib import Path

import torch

from robust_transfer.data import load_task
from robust_transfer.models import load_checkpoint, save_checkpoint
from robust_transfer.models.checkpoint import read_meta
from robust_transfer.transfer.finetune import FinetuneConfig, finetune


def source_columns(source_meta: dict) -> dict:
    """The columns that describe a source model in a results row."""
    metrics = source_meta.get("metrics", {})
    return {
        "source_task": source_meta.get("task", ""),
        "source_arch": source_meta["model"]["arch"],
        "source_eps": float(source_meta.get("eps", 0.0)),
        "source_norm": source_meta.get("norm", ""),
        "source_seed": int(source_meta.get("seed", 0)),
        "source_clean_accuracy": float(metrics.get("clean_accuracy", float("nan"))),
        "source_robust_accuracy": float(metrics.get("robust_accuracy", float("nan"))),
    }


def finetune_from_checkpoint(
    source_dir: str | Path,
    cfg: FinetuneConfig,
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Fine-tune the checkpoint at `source_dir` per `cfg`; one tidy row per epoch.

    Rows carry the source's eps/norm/task, every field of `cfg` (None printed as "all") and
    the epoch's test accuracy. With `out_dir`, the fine-tuned model is saved there as a
    checkpoint whose metadata names its source and recipe.
    """
    model, source_meta = load_checkpoint(source_dir, device)
    history = finetune(model, cfg)
    config = {
        "target_task": cfg.target_task,
        "target_classes": load_task(cfg.target_task).num_classes,
        "images_per_class": "all" if cfg.images_per_class is None else str(cfg.images_per_class),
        "unfrozen_blocks": "all" if cfg.unfrozen_blocks is None else str(cfg.unfrozen_blocks),
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }
    rows = [{**source_columns(source_meta), **config, **record} for record in history]
    if out_dir is not None:
        meta = {
            "role": "finetune",
            "source": {"path": str(source_dir), **source_columns(read_meta(source_dir))},
            "finetune": cfg.to_dict(),
            "task": cfg.target_task,
            "seed": cfg.seed,
            "metrics": {"test_accuracy": history[-1]["test_accuracy"]},
            "history": history,
        }
        save_checkpoint(model, out_dir, meta)
    return rows
