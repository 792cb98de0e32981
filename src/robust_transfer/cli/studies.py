"""Running any study from the command line: the options every study command shares
(`--spec`, `--save-spec`, `--out`, `--workers`, `--executor`, `--address`, `--device`), the
progress bars and the closing "N runs in S s" line, and `robust-transfer run SPEC`, which
runs whichever study a spec names."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import typer
from typer._click.core import ParameterSource
from typer._click.globals import get_current_context

from robust_transfer.atomic import atomic_write_text
from robust_transfer.cli import app, mark_resumable
from robust_transfer.cli.common import DEVICE_OPTION, check_output_dir, console, progress_bars
from robust_transfer.cli.common import out as stdout
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import check_device, resolve_device
from robust_transfer.plugins import parse_assignments
from robust_transfer.studies import STUDIES, load_study
from robust_transfer.transfer.executors import executors_help, make_executor
from robust_transfer.transfer.results import read_results, writer_lock
from robust_transfer.transfer.runner import (
    Study,
    plan_study,
    previous_spec_differs,
    run_study,
    spec_text,
)

SPEC_OPTION = typer.Option(None, "--spec", help="Run the study in this YAML spec (`study: "
                           "NAME` and its settings; write one with --save-spec) instead of "
                           "building it from the options.")
SAVE_SPEC_OPTION = typer.Option(None, "--save-spec", help="Write the spec these options make "
                                "to this YAML file and exit without running (run it later "
                                "with --spec FILE or `robust-transfer run FILE`).")
WORKERS_OPTION = typer.Option(1, "--workers", help="Parallel runs on this machine (each run "
                              "uses one thread, so numbers do not depend on it).")
EXECUTOR_OPTION = typer.Option("local", "--executor", help=f"{executors_help()}; Ray: pip "
                               "install robust_transfer[ray].")
EXECUTOR_OPTIONS_OPTION = typer.Option(None, "--executor-option", help="KEY=VALUE, repeatable: "
                                       "an option of a plugin executor that has no flag of "
                                       "its own (local and ray have none).")
ADDRESS_OPTION = typer.Option(None, "--address", help="Ray cluster address (e.g. auto, "
                              "ray://host:10001); default: a local Ray for this run.")


# Options that say how and where a study runs, not what it is: they go with --spec.
RUN_FLAGS = {"--spec", "--save-spec", "--out", "--workers", "--executor", "--address",
             "--executor-option", "--device", "--tasks-per-gpu"}


def study_spec(spec_file: Path | None, name: str, build: Callable[[], Study]) -> Study:
    """The study a command runs: the one in `--spec` (which must be a `name` study), else
    the one its options `build`. A setting of the study given beside `--spec` is an error,
    not silently ignored."""
    if spec_file is None:
        return build()
    ctx = get_current_context(silent=True)  # typer's own click, as cli/__init__ uses it
    given = [] if ctx is None else [
        p for p in ctx.command.params if not RUN_FLAGS & set(p.opts)
        and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    if given:
        flag = given[0].opts[0] if given[0].opts else given[0].name
        raise UserError(f"{flag} sets the study, which --spec {str(spec_file)!r} already "
                        "does; edit the spec file, or drop --spec")
    study = load_study(spec_file)
    if study.name != name:
        raise UserError(f"{str(spec_file)!r} is a {study.name} spec, not a {name} spec; run it "
                        f"with `robust-transfer run {spec_file}`")
    return study


def require_out(out: Path | None) -> Path:
    """`--out`, which running a study needs (only `--save-spec` does without it)."""
    if out is None:
        raise UserError("missing --out DIR (the study's folder; or --save-spec FILE to only "
                        "write the spec)")
    return out


def save_spec(study: Study, path: Path) -> None:
    """Write `study`'s spec to `path` (the YAML `--spec` and `run` read back)."""
    if path.is_dir():
        raise UserError(f"--save-spec {str(path)!r} is a directory; give a file name")
    atomic_write_text(path, spec_text(study))
    console.print(f"spec: {path}")


def run_with_progress(
    study: Study,
    out: Path,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    device: str = "auto",
    runs_noun: str = "runs",
    artifacts_noun: str = "source models",
    tasks_per_gpu: int = 4,
    on_unit: Callable[[list[list[dict]], float], None] | None = None,
    rates: Callable[[], str] | None = None,
    executor_options: list[str] | None = None,
) -> Path:
    """Run `study` into `out` with progress bars; print what is reused; end with the results
    line and "N runs in S s (R per s)" on stdout (progress and notes on stderr). Validates
    `--out`, the device and the executor before any work; holds `out`'s writer lock from
    the start. `rates()`: text appended inside the closing parentheses (per-engine rates)."""
    check_output_dir(out, "--out")
    check_device(device)
    if executor == "local":
        resolve_device(device)  # the runs are this machine's: absent CUDA is an error now
    pool = make_executor(executor, workers, address, tasks_per_gpu, device != "cpu",
                         parse_assignments(executor_options or [], "--executor-option"))
    mark_resumable()
    with writer_lock(out):
        if previous_spec_differs(study, out):
            console.print(f"note: {out} was run with another spec; its runs stay on disk, but "
                          "spec.yaml, results.parquet and the report now cover this spec only")
        todo = plan_study(study, out, device)
        total, done = len(todo.run_ids), len(todo.run_ids) - len(todo.pending)
        to_build = [a for stage in todo.artifacts for a in stage]
        if to_build:
            names = ", ".join(a.directory.name for a in to_build)
            console.print(f"training {len(to_build)} {artifacts_noun}: {names}",
                          soft_wrap=True)
        if done:
            rest = "running the rest" if done < total else "nothing left to run"
            console.print(f"{done} of {total} {runs_noun} already done; {rest}")
        for part in todo.corrupt:
            console.print(f"note: corrupt results part {part} cannot be read; re-running its "
                          "run", soft_wrap=True)
        start = time.perf_counter()
        with progress_bars({artifacts_noun: len(to_build), runs_noun: total}) as advance:
            advance[runs_noun](done)
            table = run_study(study, out, workers, pool, device,
                              on_artifact=lambda _d: advance[artifacts_noun](),
                              on_run=lambda _r: advance[runs_noun](), on_unit=on_unit)
        seconds = time.perf_counter() - start
    n_runs = read_results(table, study.required).run_id.nunique()
    stdout.print(f"results: {table}  ({n_runs} run{'' if n_runs == 1 else 's'})",
                 soft_wrap=True)
    ran = len(todo.pending)  # this invocation's; the time includes building its artifacts
    extra = rates() if rates else ""
    stdout.print(f"{ran} {runs_noun} in {seconds:.1f} s ({ran / max(seconds, 1e-9):.1f} per s"
                 f"{extra})", soft_wrap=True)
    return table


@app.command("run")
def run(
    spec_file: Path = typer.Argument(..., help="A study's YAML spec: a grid spec, or one with "
                                     "`study: NAME` (" + ", ".join(STUDIES.names()) + "), "
                                     "e.g. written by a study command's --save-spec."),
    out: Path = typer.Option(..., "--out", help="Directory for the study's models, results "
                             "and spec."),
    workers: int = WORKERS_OPTION,
    executor: str = EXECUTOR_OPTION,
    address: str = ADDRESS_OPTION,
    executor_option: list[str] = EXECUTOR_OPTIONS_OPTION,
    device: str = DEVICE_OPTION,
) -> None:
    """Run any study from its spec, resumably: finished runs are kept, only missing ones run,
    and `robust-transfer report OUT` draws the study's figures."""
    study = load_study(spec_file)
    run_with_progress(study, out, workers, executor, address, device,
                      executor_options=executor_option)
