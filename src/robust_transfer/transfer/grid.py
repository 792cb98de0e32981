"""Run a grid: train the missing source models, then every fine-tune not yet stored.

Resumable by construction: sources are checkpoints (meta.json written last), and a run is
done exactly when its Parquet part exists. Re-running the same spec finishes the rest.

Running a different spec into the same directory keeps the results of both on disk (runs the
two specs share are not run again) but the directory then stands for the new spec:
`spec.yaml`, `runs.json`, `results.parquet` and `report` cover the new spec's runs only.
Where runs execute is the `executor` parameter (`LocalExecutor` by default); on which device,
the `device` parameter, passed to source training and to every fine-tune.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from robust_transfer.atomic import atomic_write_text
from robust_transfer.backdoors.source import train_backdoor_source
from robust_transfer.models import save_checkpoint
from robust_transfer.models.checkpoint import META
from robust_transfer.train import SourceConfig
from robust_transfer.transfer.executors import Executor, LocalExecutor
from robust_transfer.transfer.finetune import FinetuneConfig
from robust_transfer.transfer.results import (
    append_run,
    consolidate,
    done_run_ids,
    write_manifest,
)
from robust_transfer.transfer.run import finetune_from_checkpoint
from robust_transfer.transfer.spec import GridSpec, Run, expand

SOURCES = "sources"
SPEC = "spec.yaml"


def demo_spec_path() -> Path:
    """The demo spec shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "specs" / "demo.yaml"


def backdoor_spec_path() -> Path:
    """The backdoor-transfer spec shipped inside the package (`backdoor transfer`)."""
    return Path(__file__).resolve().parent.parent / "specs" / "backdoor.yaml"


@dataclass(frozen=True)
class _SourceJob:
    config: SourceConfig
    directory: Path
    device: str = "cpu"


@dataclass(frozen=True)
class _FinetuneJob:
    run_id: str
    source_dir: Path
    config: FinetuneConfig
    device: str = "cpu"
    probes: tuple = ()  # backdoors whose triggers are evaluated per epoch (`Run.probes`)


def _train_source_job(job: _SourceJob) -> Path:
    model, meta = train_backdoor_source(job.config, job.device)  # + ASR when backdoored
    save_checkpoint(model, job.directory, meta)
    return job.directory


def _finetune_job(job: _FinetuneJob) -> list[dict]:
    rows = finetune_from_checkpoint(job.source_dir, job.config, device=job.device,
                                    probes=job.probes)
    return [{"run_id": job.run_id, **row} for row in rows]


@dataclass(frozen=True)
class GridPlan:
    runs: list[Run]
    sources_to_train: list[_SourceJob]
    pending: list[_FinetuneJob]


def plan(spec: GridSpec, out: Path, device: str = "cpu") -> GridPlan:
    """What is still to do for `spec` in `out`."""
    out, device = Path(out), str(device)
    runs = expand(spec)
    source_dirs = {r.source_id: (r.source, out / SOURCES / r.source_id) for r in runs}
    to_train = [
        _SourceJob(cfg, d, device) for cfg, d in source_dirs.values()
        if not (d / META).is_file()
    ]
    done = done_run_ids(out)
    pending = [
        _FinetuneJob(r.run_id, out / SOURCES / r.source_id, r.finetune, device, r.probes)
        for r in runs if r.run_id not in done
    ]
    return GridPlan(runs, to_train, pending)


def spec_text(spec: GridSpec) -> str:
    """The spec as YAML, as it is recorded in the grid directory."""
    return yaml.safe_dump(_spec_dict(spec), sort_keys=False)


def previous_spec_differs(spec: GridSpec, out: str | Path) -> bool:
    """True when `out` was last run with another spec (its results stay; the table, the
    printed count and the report will cover `spec` only)."""
    recorded = Path(out) / SPEC
    return recorded.is_file() and recorded.read_text(errors="replace") != spec_text(spec)


def run_grid(
    spec: GridSpec,
    out: str | Path,
    workers: int = 1,
    executor: Executor | None = None,
    device: str | torch.device = "cpu",
    on_source_done: Callable[[Path], None] | None = None,
    on_run_done: Callable[[str], None] | None = None,
) -> Path:
    """Run everything `spec` asks for that `out` does not hold yet; return the table's path.

    Sources train first, then the fine-tunes, both through `executor` (default: a
    `LocalExecutor` of `workers` processes; entered here as a context manager) on `device`.
    The main process alone writes results, one atomic Parquet part per finished run; the
    returned `results.parquet` holds the finished runs of `spec` only.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = expand(spec)
    atomic_write_text(out / SPEC, spec_text(spec))
    write_manifest(out, [r.run_id for r in runs])
    todo = plan(spec, out, str(device))
    with (executor if executor is not None else LocalExecutor(workers)) as pool:
        for _job, directory in pool.map_unordered(_train_source_job, todo.sources_to_train):
            if on_source_done:
                on_source_done(directory)
        for job, rows in pool.map_unordered(_finetune_job, todo.pending):
            append_run(out, job.run_id, rows)
            if on_run_done:
                on_run_done(job.run_id)
    return consolidate(out)


def _spec_dict(spec: GridSpec) -> dict:
    """The spec as plain YAML-able data, as it was run (for the record)."""
    return {
        "name": spec.name,
        "source": vars(spec.source),
        "sources": [e.to_dict() for e in spec.sources],
        "targets": list(spec.targets),
        "images_per_class": list(spec.images_per_class),
        "unfrozen_blocks": ["all" if k is None else k for k in spec.unfrozen_blocks],
        "epochs": list(spec.epochs),
        "seeds": list(spec.seeds),
        "lr": list(spec.lr),
        "batch_size": spec.batch_size,
    }
