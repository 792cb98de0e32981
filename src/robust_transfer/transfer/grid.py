"""Run a grid: train the missing source models, then every fine-tune not yet stored.

Resumable by construction: sources are checkpoints (meta.json written last), and a run is
done exactly when its Parquet part exists and reads. Re-running the same spec finishes the
rest, and gives the numbers of an uninterrupted run: every source training and fine-tune
runs on `runner.RUN_THREADS` intra-op threads, whichever executor, worker count or machine runs it
and however many runs are left (CPU float sums depend on the thread count). One grid writes
a directory at a time (`results.writer_lock`).

Running a different spec into the same directory keeps the results of both on disk (runs the
two specs share are not run again) but the directory then stands for the new spec:
`spec.yaml`, `runs.json`, `results.parquet` and `report` cover the new spec's runs only.
Distilled sources (a `distill:` key in the spec) train after the other sources, from their
teacher's checkpoint. Where runs execute is the `executor` parameter (`LocalExecutor` by
default); on which device, the `device` parameter ("auto" | "cpu" | "cuda"), shipped
unresolved in every job and resolved by the worker that runs it (`worker_device`), so a Ray
worker on a GPU machine takes its GPU whatever the driver has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from robust_transfer.backdoors.source import train_backdoor_source
from robust_transfer.data.tasks import ALL
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import (
    ModelSpec,
    SourceCard,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from robust_transfer.models.runtime import DEVICES, resolve_device
from robust_transfer.train import SourceConfig
from robust_transfer.transfer import runner
from robust_transfer.transfer.certify_eval import CertifySpec
from robust_transfer.transfer.engines import GRID_ENGINES, why_not
from robust_transfer.transfer.executors import Executor
from robust_transfer.transfer.finetune import FinetuneConfig
from robust_transfer.transfer.results import REQUIRED_COLUMNS
from robust_transfer.transfer.run import finetune_many_from_checkpoint
from robust_transfer.transfer.runner import (
    SOURCES,
    Artifact,
    Unit,
    plan_study,
    run_study,
)
from robust_transfer.transfer.spec import GridSpec, Run, content_id, expand, grid_options
from robust_transfer.transfer.stacked import shape_key

# Runs per executor work unit (`batches`): at most MAX_BATCH, and a shape with fewer than
# MIN_BATCH pending runs is shipped run by run.
MAX_BATCH = 64
MIN_BATCH = 4


def demo_spec_path() -> Path:
    """The demo spec shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "specs" / "demo.yaml"


def backdoor_spec_path() -> Path:
    """The backdoor-transfer spec shipped inside the package (`backdoor transfer`)."""
    return Path(__file__).resolve().parent.parent / "specs" / "backdoor.yaml"


@dataclass(frozen=True)
class SourceJob:
    """One source model to train into `directory` (a `runner.Artifact`'s job): the grid's,
    and the other studies' (bias, backdoor updates, watermark) that train sources too."""

    config: SourceConfig
    directory: Path
    device: str = "cpu"
    teacher_dir: Path | None = None  # a distilled source's teacher checkpoint


@dataclass(frozen=True)
class _FinetuneJob:
    run_id: str
    source_dir: Path
    config: FinetuneConfig
    device: str = "cpu"
    probes: tuple = ()  # backdoors whose triggers are evaluated per epoch (`Run.probes`)
    certify: CertifySpec | None = None  # certify the final model (`Run.certify`)


def worker_device(name: str) -> torch.device:
    """A job's device, resolved here, on the worker that runs it: "auto" is this machine's
    answer (a Ray worker's GPU), not the driver's. A name outside `DEVICES` is a torch
    device string given to the Python API (e.g. "cuda:1"), taken as it is."""
    return resolve_device(name) if name in DEVICES else torch.device(name)


def train_source_job(job: SourceJob) -> Path:
    """Train `job`'s source on the worker that runs it (its teacher loaded there when
    distilled) and save it as a checkpoint (meta.json last: resumable); its directory."""
    teacher, device = None, worker_device(job.device)
    if job.teacher_dir is not None:
        teacher, _ = load_checkpoint(job.teacher_dir, device)
    # + the backdoor's ASR in the metrics when backdoored
    model, card = train_backdoor_source(job.config, device, teacher=teacher)
    if job.teacher_dir is not None:
        card.teacher_path = str(job.teacher_dir)
    save_checkpoint(model, job.directory, card)
    return job.directory


@dataclass(frozen=True)
class _FinetuneBatch:
    """The unit of work shipped to an executor: runs of one source that differ only in their
    seed (`stacked.shape_key`), trained together where a batched engine covers them
    (`engine`, `max_memory`: as `run.finetune_many_from_checkpoint` takes them)."""

    jobs: tuple[_FinetuneJob, ...]
    engine: str = "auto"
    max_memory: int | None = None

    @property
    def device(self) -> str:
        return self.jobs[0].device


def _finetune_batch_job(batch: _FinetuneBatch) -> list[list[dict]]:
    """The rows of each run of the batch, in the batch's order."""
    first = batch.jobs[0]
    return finetune_many_from_checkpoint(first.source_dir, [j.config for j in batch.jobs],
                                         worker_device(first.device), first.probes,
                                         batch.engine, batch.max_memory, first.certify)


def check_engine(spec: GridSpec, engine: str) -> None:
    """With `engine` "batched", a `UserError` naming the first run of `spec` that no batched
    engine covers (checked on the spec, before anything runs: every grid source is a standard
    `train_source` checkpoint, so its recipe, the fine-tune config and the probes decide)."""
    check_choice("engine", engine, GRID_ENGINES)
    if engine != "batched":
        return
    models: dict[str, nn.Module] = {}
    for r in expand(spec):
        if r.source.arch not in models:  # the architecture as the grid will build it
            models[r.source.arch] = build_model(ModelSpec(r.source.arch, 2, 1, (0.5,), (0.5,)))
        model = models[r.source.arch]
        card = SourceCard(role="source", recipe=r.source.to_dict())
        reason = why_not(model, r.finetune, card, r.probes, r.certify)
        if reason is not None:
            raise UserError(f"--engine batched cannot run source {r.source_id} -> "
                            f"{r.finetune.target_task}: {reason}; use --engine auto or "
                            "per-run")


def batches(pending: list[_FinetuneJob], max_runs: int = MAX_BATCH, engine: str = "auto",
            max_memory: int | None = None) -> list[_FinetuneBatch]:
    """Pending runs as executor work units: runs of one (source, shape) together, at most
    `max_runs` per unit; a shape with fewer than `MIN_BATCH` pending runs goes run by run
    (too few to gain from batching, and finer units balance workers and progress better).
    Costliest units first (more unfrozen blocks, more images, more epochs), so that the
    workers finish together."""
    groups: dict[tuple, list[_FinetuneJob]] = {}
    for job in pending:
        groups.setdefault((job.source_dir, shape_key(job.config)), []).append(job)
    units = []
    for jobs in groups.values():
        size = max_runs if len(jobs) >= MIN_BATCH else 1
        units += [_FinetuneBatch(tuple(jobs[i : i + size]), engine, max_memory)
                  for i in range(0, len(jobs), size)]

    def cost(unit: _FinetuneBatch) -> tuple:
        c = unit.jobs[0].config
        blocks = float("inf") if c.unfrozen_blocks is None else c.unfrozen_blocks
        shots = float("inf") if c.images_per_class == ALL else c.images_per_class
        return (blocks, shots, c.epochs, len(unit.jobs))

    return sorted(units, key=cost, reverse=True)


@dataclass(frozen=True)
class GridStudy:
    """The grid as a study (`runner.Study`): sources are its artifacts (teachers, then the
    sources distilled from them), fine-tunes its runs, shipped in `batches`. Its recorded
    spec has no `study:` key: grid folders of every version read as grids."""

    spec: GridSpec
    engine: str = "auto"
    max_memory: int | None = None
    name = "grid"
    required = REQUIRED_COLUMNS

    def record(self) -> dict:
        return _spec_dict(self.spec)

    def run_ids(self) -> list[str]:
        return [r.run_id for r in expand(self.spec)]

    def artifacts(self, out: Path, device: str) -> list[list[Artifact]]:
        jobs = _source_jobs(self.spec, out, device)
        return [[Artifact(j.directory, train_source_job, j) for j in jobs
                 if (j.teacher_dir is None) == first] for first in (True, False)]

    def units(self, pending: list[str], out: Path, device: str) -> list[Unit]:
        runs = {r.run_id: r for r in expand(self.spec)}
        jobs = [_finetune_job(runs[run_id], out, device) for run_id in pending]
        return [Unit(tuple(j.run_id for j in b.jobs), _finetune_batch_job, b)
                for b in batches(jobs, engine=self.engine, max_memory=self.max_memory)]


def _source_jobs(spec: GridSpec, out: Path, device: str) -> list[SourceJob]:
    """Every source of `spec` as a training job (trained or not), in spec order."""
    source_dirs = {r.source_id: (r.source, out / SOURCES / r.source_id) for r in expand(spec)}
    by_recipe = {content_id(cfg.to_dict()): d for cfg, d in source_dirs.values()}

    def teacher_dir(cfg: SourceConfig) -> Path | None:
        return None if cfg.distill is None else by_recipe[content_id(cfg.distill.teacher)]

    return [SourceJob(cfg, d, device, teacher_dir(cfg)) for cfg, d in source_dirs.values()]


def _finetune_job(r: Run, out: Path, device: str) -> _FinetuneJob:
    return _FinetuneJob(r.run_id, out / SOURCES / r.source_id, r.finetune, device, r.probes,
                        r.certify)


@dataclass(frozen=True)
class GridPlan:
    runs: list[Run]
    sources_to_train: list[SourceJob]
    pending: list[_FinetuneJob]
    corrupt: list[Path]  # unreadable parts of the spec's runs: re-run (`pending`), overwritten


def plan(spec: GridSpec, out: Path, device: str = "cpu") -> GridPlan:
    """What is still to do for `spec` in `out` (`runner.plan_study`, as grid jobs)."""
    out, device = Path(out), str(device)
    todo = plan_study(GridStudy(spec), out, device)
    runs = {r.run_id: r for r in expand(spec)}
    return GridPlan(list(runs.values()), [a.job for stage in todo.artifacts for a in stage],
                    [_finetune_job(runs[i], out, device) for i in todo.pending], todo.corrupt)


def spec_text(spec: GridSpec) -> str:
    """The spec as YAML, as it is recorded in the grid directory."""
    return runner.spec_text(GridStudy(spec))


def previous_spec_differs(spec: GridSpec, out: str | Path) -> bool:
    """True when `out` was last run with another spec (its results stay; the table, the
    printed count and the report will cover `spec` only)."""
    return runner.previous_spec_differs(GridStudy(spec), out)


def run_grid(
    spec: GridSpec,
    out: str | Path,
    workers: int = 1,
    executor: Executor | None = None,
    device: str | torch.device = "cpu",
    on_source_done: Callable[[Path], None] | None = None,
    on_run_done: Callable[[str], None] | None = None,
    engine: str = "auto",
    max_memory: int | None = None,
    on_engine_time: Callable[[str, int, float], None] | None = None,
) -> Path:
    """Run everything `spec` asks for that `out` does not hold yet; return the table's path.

    `runner.run_study` on the `GridStudy`: sources train first, then the fine-tunes, both
    through `executor` (default: a `LocalExecutor` of `workers` processes) on `device` (as
    the user names it; each worker resolves it, `worker_device`); one atomic Parquet part per
    finished run, written by this process alone, under `out`'s writer lock.
    `engine` auto | batched | per-run and `max_memory` (bytes): as
    `run.finetune_many_from_checkpoint` takes them; "batched" on a run no batched engine
    covers is a `UserError` before anything is written (`check_engine`).
    `on_engine_time(engine, runs, seconds)`: after each work unit, its runs per engine and
    its wall time (split by runs between engines; summed over workers, not wall time).
    """
    check_engine(spec, engine)
    return run_study(GridStudy(spec, engine, max_memory), out, workers, executor, str(device),
                     on_source_done, on_run_done,
                     engine_times(on_engine_time) if on_engine_time else None)


def engine_times(on_engine_time: Callable[[str, int, float], None]
                 ) -> Callable[[list[list[dict]], float], None]:
    """A `runner.run_study` `on_unit` callback that reports each grid work unit as
    `on_engine_time(engine, runs, seconds)` per engine its runs used, the unit's wall time
    split between the engines by runs."""

    def unit_done(results: list[list[dict]], seconds: float) -> None:
        used = [rows[0]["engine"] for rows in results if rows]
        for name in sorted(set(used)):
            n = used.count(name)
            on_engine_time(name, n, seconds * n / len(used))

    return unit_done


def _spec_dict(spec: GridSpec) -> dict:
    """The spec as plain YAML-able data, as it was run (for the record)."""
    d = {
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
    # Fine-tune variables and certify recorded only when set, so specs without them keep
    # their recorded text (and order: single-valued variables, certify, crossed ones).
    crossed = grid_options()
    for name, values in spec.options:
        if not crossed[name][0] and values != (crossed[name][1],):
            d[name] = values[0]
    if spec.certify is not None:
        d["certify"] = spec.certify.to_dict()
    for name, values in spec.options:
        if crossed[name][0] and values != (crossed[name][1],):
            d[name] = list(values)
    return d
