"""Run a grid: train the missing source models, then every fine-tune not yet stored.

Resumable by construction: sources are checkpoints (meta.json written last), and a run is
done exactly when its Parquet part exists. Re-running the same spec finishes the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from robust_transfer.models import save_checkpoint
from robust_transfer.models.checkpoint import META
from robust_transfer.train import SourceConfig, train_source
from robust_transfer.transfer.executors import LocalExecutor
from robust_transfer.transfer.finetune import FinetuneConfig
from robust_transfer.transfer.results import append_run, consolidate, done_run_ids
from robust_transfer.transfer.run import finetune_from_checkpoint
from robust_transfer.transfer.spec import GridSpec, Run, expand

SOURCES = "sources"


def demo_spec_path() -> Path:
    """The demo spec shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "specs" / "demo.yaml"


@dataclass(frozen=True)
class _SourceJob:
    config: SourceConfig
    directory: Path


@dataclass(frozen=True)
class _FinetuneJob:
    run_id: str
    source_dir: Path
    config: FinetuneConfig


def _train_source_job(job: _SourceJob) -> Path:
    model, meta = train_source(job.config)
    save_checkpoint(model, job.directory, meta)
    return job.directory


def _finetune_job(job: _FinetuneJob) -> list[dict]:
    rows = finetune_from_checkpoint(job.source_dir, job.config)
    return [{"run_id": job.run_id, **row} for row in rows]


@dataclass(frozen=True)
class GridPlan:
    runs: list[Run]
    sources_to_train: list[_SourceJob]
    pending: list[_FinetuneJob]


def plan(spec: GridSpec, out: Path) -> GridPlan:
    """What is still to do for `spec` in `out`."""
    runs = expand(spec)
    source_dirs = {r.source_id: (r.source, out / SOURCES / r.source_id) for r in runs}
    to_train = [
        _SourceJob(cfg, d) for cfg, d in source_dirs.values() if not (d / META).is_file()
    ]
    done = done_run_ids(out)
    pending = [
        _FinetuneJob(r.run_id, out / SOURCES / r.source_id, r.finetune)
        for r in runs if r.run_id not in done
    ]
    return GridPlan(runs, to_train, pending)


def run_grid(
    spec: GridSpec,
    out: str | Path,
    workers: int = 1,
    on_source_done: Callable[[Path], None] | None = None,
    on_run_done: Callable[[str], None] | None = None,
) -> Path:
    """Run everything `spec` asks for that `out` does not hold yet; return the table's path.

    Sources train first (in parallel), then fine-tunes run in `workers` processes; the main
    process alone writes results, one atomic Parquet part per finished run.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(_spec_dict(spec), sort_keys=False))
    todo = plan(spec, out)
    with LocalExecutor(workers) as executor:
        for _job, directory in executor.map_unordered(_train_source_job, todo.sources_to_train):
            if on_source_done:
                on_source_done(directory)
        for job, rows in executor.map_unordered(_finetune_job, todo.pending):
            append_run(out, job.run_id, rows)
            if on_run_done:
                on_run_done(job.run_id)
    return consolidate(out)


def _spec_dict(spec: GridSpec) -> dict:
    """The spec as plain YAML-able data, as it was run (for the record)."""
    def shots(v):
        return "all" if v is None else v

    return {
        "name": spec.name,
        "source": vars(spec.source),
        "sources": [{"eps": e, "norm": n} for e, n in spec.sources],
        "targets": list(spec.targets),
        "images_per_class": [shots(k) for k in spec.images_per_class],
        "unfrozen_blocks": [shots(k) for k in spec.unfrozen_blocks],
        "epochs": list(spec.epochs),
        "seeds": list(spec.seeds),
        "lr": list(spec.lr),
        "batch_size": spec.batch_size,
    }
