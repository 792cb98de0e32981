"""The one planner, executor and results store that every study runs on.

A study (the robust-transfer grid, bias transfer, watermark removal, ... : `studies/`) is a
spec that says three things, and this module does the rest:

- `run_ids()`: every run of the spec (a content id: the same settings, the same id);
- `artifacts(out, device)`: the models its runs read (source checkpoints), in stages built
  in order (a distilled source after its teacher). An artifact is done once its directory
  holds `meta.json` (checkpoints write it last), so it is built once, ever;
- `units(pending, out, device)`: the pending runs as work units, each a picklable
  module-level `fn(job)` that returns one list of result rows per run id of the unit.

`run_study` then gives every study, with no code of its own: the writer lock, the recorded
spec (`spec.yaml`) and run list (`runs.json`), resume after `kill -9` or Ctrl-C with no lost
and no duplicate rows (a run is done exactly when its Parquet part exists and reads: one
atomic part per run, written by this process alone), any executor (`--workers`,
`--executor ray`), and progress callbacks. Every unit runs on `RUN_THREADS` intra-op threads
wherever it runs, so a resumed study, or one run on Ray, gives the numbers of an
uninterrupted local one (CPU float sums depend on the thread count).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from robust_transfer.atomic import atomic_write_text
from robust_transfer.models.checkpoint import META
from robust_transfer.models.runtime import torch_threads
from robust_transfer.transfer.executors import Executor, LocalExecutor
from robust_transfer.transfer.results import (
    append_run,
    consolidate,
    scan_parts,
    write_manifest,
    writer_lock,
)

SPEC = "spec.yaml"
SOURCES = "sources"
# Intra-op threads of every unit of work: part of how a run is computed, so fixed here
# rather than inherited from the worker (a resumed grid with one source left used to train
# it in the main process on all cores: other weights). Studies parallelise across runs.
RUN_THREADS = 1


@dataclass(frozen=True)
class Artifact:
    """A model the runs read, built by `build(job)` into `directory` (done once
    `directory/meta.json` exists). `build` and `job` must pickle (module-level function,
    frozen dataclass) for executors that run elsewhere."""

    directory: Path
    build: Callable[[Any], Any]
    job: Any

    @property
    def done(self) -> bool:
        return (self.directory / META).is_file()


@dataclass(frozen=True)
class Unit:
    """Runs shipped together: `fn(job)` -> one list of rows per id of `run_ids`, in order."""

    run_ids: tuple[str, ...]
    fn: Callable[[Any], list[list[dict]]]
    job: Any


class Study(Protocol):
    """What a study declares; `run_study` runs it. `name`: recorded in `spec.yaml` (`study:`),
    so that `report DIR` knows the folder; `required`: the columns a finished run's part
    must hold (a part without them, from an older version, is re-run)."""

    name: str
    required: tuple[str, ...]

    def record(self) -> dict: ...

    def run_ids(self) -> list[str]: ...

    def artifacts(self, out: Path, device: str) -> list[list[Artifact]]: ...

    def units(self, pending: list[str], out: Path, device: str) -> list[Unit]: ...


def spec_text(study: Study) -> str:
    """The spec as YAML, as it is recorded in the study's folder."""
    return yaml.safe_dump(study.record(), sort_keys=False)


def previous_spec_differs(study: Study, out: str | Path) -> bool:
    """True when `out` was last run with another spec (its results stay; the table, the
    printed count and the report will cover `study`'s runs only)."""
    recorded = Path(out) / SPEC
    return recorded.is_file() and recorded.read_text(errors="replace") != spec_text(study)


@dataclass(frozen=True)
class StudyPlan:
    run_ids: list[str]
    artifacts: list[list[Artifact]]  # stages of artifacts still to build
    pending: list[str]  # runs still to run, in spec order
    corrupt: list[Path]  # unreadable parts of the spec's runs: re-run, overwritten


def plan_study(study: Study, out: str | Path, device: str = "cpu") -> StudyPlan:
    """What is still to do for `study` in `out`."""
    out = Path(out)
    run_ids = study.run_ids()
    stages = [[a for a in stage if not a.done] for stage in study.artifacts(out, str(device))]
    scan = scan_parts(out, set(run_ids), study.required)
    pending = [r for r in dict.fromkeys(run_ids) if r not in scan.done]
    return StudyPlan(run_ids, [s for s in stages if s], pending, scan.corrupt)


def _build(artifact: Artifact) -> Path:
    with torch_threads(RUN_THREADS):
        artifact.build(artifact.job)
    return artifact.directory


def _execute(unit: Unit) -> tuple[list[list[dict]], float]:
    """(rows per run of the unit, each tagged with its run id; the unit's wall time in s)."""
    start = time.perf_counter()
    with torch_threads(RUN_THREADS):
        results = unit.fn(unit.job)
    rows = [[{"run_id": run_id, **row} for row in run_rows]
            for run_id, run_rows in zip(unit.run_ids, results, strict=True)]
    return rows, time.perf_counter() - start


def run_study(
    study: Study,
    out: str | Path,
    workers: int = 1,
    executor: Executor | None = None,
    device: str = "cpu",
    on_artifact: Callable[[Path], None] | None = None,
    on_run: Callable[[str], None] | None = None,
    on_unit: Callable[[list[list[dict]], float], None] | None = None,
) -> Path:
    """Run everything `study` asks for that `out` does not hold yet; return the table's path.

    Artifacts first (stage by stage), then the pending runs, all through `executor`
    (default: a `LocalExecutor` of `workers` processes; entered here as a context manager),
    on `device` as the user names it (each job resolves it where it runs). The main process
    alone writes results, one atomic Parquet part per finished run; the returned
    `results.parquet` holds the spec's finished runs only. Holds `out`'s writer lock
    throughout: a second writer is refused (`UserError`) before anything is written.
    `on_unit(rows, seconds)`: after each work unit, its rows per run and its wall time.
    """
    out = Path(out)
    with writer_lock(out):
        run_ids = study.run_ids()
        atomic_write_text(out / SPEC, spec_text(study))
        write_manifest(out, run_ids)
        todo = plan_study(study, out, str(device))
        with (executor if executor is not None else LocalExecutor(workers)) as pool:
            for stage in todo.artifacts:
                for _artifact, directory in pool.map_unordered(_build, stage):
                    if on_artifact:
                        on_artifact(directory)
            units = study.units(todo.pending, out, str(device))
            for unit, (rows, seconds) in pool.map_unordered(_execute, units):
                for run_id, run_rows in zip(unit.run_ids, rows, strict=True):
                    append_run(out, run_id, run_rows)
                    if on_run:
                        on_run(run_id)
                if on_unit:
                    on_unit(rows, seconds)
        return consolidate(out, study.required)
