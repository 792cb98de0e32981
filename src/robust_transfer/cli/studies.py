"""Running any study from the command line: the options every study command shares
(`--spec`, `--save-spec`, `--out`, `--workers`, `--executor`, `--address`, `--device`), the
progress bars and the closing "N runs in S s" line, and `robust-transfer run SPEC`, which
runs whichever study a spec names."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer
from typer._click.core import ParameterSource
from typer._click.globals import get_current_context

from robust_transfer.atomic import atomic_write_text
from robust_transfer.cli import app, mark_resumable
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    check_output_dir,
    console,
    progress_bars,
    with_options,
)
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

_SPEC_OPTION = typer.Option(None, "--spec", help="Run the study in this YAML spec (`study: "
                           "NAME` and its settings; write one with --save-spec) instead of "
                           "building it from the options.")
_SAVE_SPEC_OPTION = typer.Option(None, "--save-spec", help="Write the spec these options make "
                                "to this YAML file and exit without running (run it later "
                                "with --spec FILE or `robust-transfer run FILE`).")
_EXECUTOR_OPTION = typer.Option("local", "--executor", help=f"{executors_help()}; Ray: pip "
                               "install robust_transfer[ray].")
_EXECUTOR_OPTIONS_OPTION = typer.Option(None, "--executor-option", help="KEY=VALUE, repeatable: "
                                       "an option of a plugin executor that has no flag of "
                                       "its own (local and ray have none).")
_ADDRESS_OPTION = typer.Option(None, "--address", help="Ray cluster address (e.g. auto, "
                              "ray://host:10001); default: a local Ray for this run.")


def _workers_option(default: int) -> typer.models.OptionInfo:
    return typer.Option(default, "--workers", help="Parallel runs on this machine (each run "
                        "uses one thread, so numbers do not depend on it).")


@dataclass(frozen=True)
class StudyRun:
    """The options every study command shares (`study_options` adds them to its signature):
    where the study's spec comes from (`--spec`) or goes (`--save-spec`), and how its runs
    are executed."""

    spec: Path | None = None
    save_spec: Path | None = None
    workers: int = 1
    executor: str = "local"
    address: str | None = None
    executor_options: tuple[str, ...] = ()

    def study(self, name: str, build: Callable[[], Study]) -> Study:
        """The study the command runs: the one in `--spec` (which must be a `name` study),
        else the one its options `build`. A setting of the study given beside `--spec` is an
        error, not silently ignored."""
        if self.spec is None:
            return build()
        ctx = get_current_context(silent=True)  # typer's own click, as cli/__init__ uses it
        given = [] if ctx is None else [
            p for p in ctx.command.params if not RUN_FLAGS & set(p.opts)
            and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
        if given:
            flag = given[0].opts[0] if given[0].opts else given[0].name
            raise UserError(f"{flag} sets the study, which --spec {str(self.spec)!r} already "
                            "does; edit the spec file, or drop --spec")
        study = load_study(self.spec)
        if study.name != name:
            raise UserError(f"{str(self.spec)!r} is a {study.name} spec, not a {name} spec; "
                            f"run it with `robust-transfer run {self.spec}`")
        return study

    def saved(self, study: Study) -> bool:
        """With `--save-spec FILE`: write `study`'s spec there (the YAML `--spec` and `run`
        read back) and say so; the command then stops."""
        if self.save_spec is None:
            return False
        if self.save_spec.is_dir():
            raise UserError(f"--save-spec {str(self.save_spec)!r} is a directory; give a file "
                            "name")
        atomic_write_text(self.save_spec, spec_text(study))
        console.print(f"spec: {self.save_spec}")
        return True


# parameter -> (StudyRun field, type, option) of the shared options, in --help order
_SHARED = {
    "spec_file": ("spec", Path, _SPEC_OPTION),
    "save_spec_file": ("save_spec", Path, _SAVE_SPEC_OPTION),
    "workers": ("workers", int, None),  # the command's own default: `_workers_option`
    "executor": ("executor", str, _EXECUTOR_OPTION),
    "address": ("address", str, _ADDRESS_OPTION),
    "executor_option": ("executor_options", list[str], _EXECUTOR_OPTIONS_OPTION),
}
# Options that say how and where a study runs, not what it is: they go with --spec (the
# shared ones, and the commands' own --out, --device and --tasks-per-gpu).
RUN_FLAGS = {decl for _, _, option in _SHARED.values()
             for decl in (option or _workers_option(1)).param_decls}
RUN_FLAGS |= {"--out", "--device", "--tasks-per-gpu"}


def study_options(*, spec: bool = True, save_spec: bool = True, workers: int = 1):
    """Decorator for a study command (`cli.common.with_options`): adds the shared options
    after the command's own and hands them to it as one `run: StudyRun` argument.
    `spec=False` for a command that takes its spec file as an argument of its own;
    `save_spec=False` for one that only runs a given spec; `workers`: the --workers default.
    Put it below `@app.command`."""
    skip = {name for name, keep in (("spec_file", spec), ("save_spec_file", save_spec))
            if not keep}
    extra = {name: (kind, option or _workers_option(workers))
             for name, (_, kind, option) in _SHARED.items() if name not in skip}

    def make(values: dict) -> StudyRun:
        fields = {_SHARED[name][0]: value for name, value in values.items()}
        fields["executor_options"] = tuple(fields.get("executor_options") or ())
        return StudyRun(**fields)

    return with_options(extra, "run", make)


def require_out(out: Path | None) -> Path:
    """`--out`, which running a study needs (only `--save-spec` does without it)."""
    if out is None:
        raise UserError("missing --out DIR (the study's folder; or --save-spec FILE to only "
                        "write the spec)")
    return out


def run_with_progress(
    study: Study,
    out: Path,
    run: StudyRun,
    device: str = "auto",
    runs_noun: str = "runs",
    artifacts_noun: str = "source models",
    tasks_per_gpu: int = 4,
    on_unit: Callable[[list[list[dict]], float], None] | None = None,
    rates: Callable[[], str] | None = None,
) -> Path:
    """Run `study` into `out` with progress bars; print what is reused; end with the results
    line and "N runs in S s (R per s)" on stdout (progress and notes on stderr). Validates
    `--out`, the device and the executor before any work; holds `out`'s writer lock from
    the start. `rates()`: text appended inside the closing parentheses (per-engine rates)."""
    check_output_dir(out, "--out")
    check_device(device)
    if run.executor == "local":
        resolve_device(device)  # the runs are this machine's: absent CUDA is an error now
    pool = make_executor(run.executor, run.workers, run.address, tasks_per_gpu,
                         device != "cpu", parse_assignments(list(run.executor_options),
                                                             "--executor-option"))
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
            table = run_study(study, out, run.workers, pool, device,
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
@study_options(spec=False, save_spec=False)
def run(
    spec_file: Path = typer.Argument(..., help="A study's YAML spec: a grid spec, or one with "
                                     "`study: NAME` (" + ", ".join(STUDIES.names()) + "), "
                                     "e.g. written by a study command's --save-spec."),
    out: Path = typer.Option(..., "--out", help="Directory for the study's models, results "
                             "and spec."),
    device: str = DEVICE_OPTION,
    *,
    run: StudyRun,
) -> None:
    """Run any study from its spec, resumably: finished runs are kept, only missing ones run,
    and `robust-transfer report OUT` draws the study's figures."""
    run_with_progress(load_study(spec_file), out, run, device)
