"""`robust-transfer backdoor updates --out DIR`: does a one-shot backdoor survive periodic
model updates on drifting clean data (Li et al. 2022)? Thin: the options build the study's
spec (`studies.updates.SurvivalStudy`), the one runner runs it, `report.updates_figures`
draws and summarises it."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.backdoors.updates import LR_SCHEDULES
from robust_transfer.cli.backdoor import TASK_NAMES, backdoor_app
from robust_transfer.cli.common import DEVICE_OPTION, console, print_table
from robust_transfer.cli.studies import StudyRun, require_out, run_with_progress, study_options
from robust_transfer.data.drift import DRIFTS
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.errors import UserError
from robust_transfer.report.updates_figures import (
    ASR_THRESHOLD,
    headline_rows,
    make_survival_report,
)
from robust_transfer.studies.updates import SurvivalStudy
from robust_transfer.transfer.results import read_results


@backdoor_app.command("updates")
@study_options()
def updates(
    out: Path = typer.Option(None, "--out", help="Directory for the study (poisoned "
                             "sources, results, spec), the figure and the summary."),
    task: str = typer.Option(None, help=f"Task (default digits): {TASK_NAMES}."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Start every seed from this "
                                    "poisoned checkpoint (`backdoor attack`) instead of "
                                    "training one per seed."),
    drift: list[str] = typer.Option(None, "--drift", help=f"{' | '.join(DRIFTS)} (repeatable; "
                                    "default: both)."),
    strength: list[float] = typer.Option(None, "--strength", help="Drift strengths in [0, 1], "
                                         "several after one flag (default 0 0.5 1); 0 = plain "
                                         "clean updates."),
    n_updates: int = typer.Option(5, "--updates", help="Model updates after poisoning."),
    update_images: list[int] = typer.Option(None, "--update-images", help="Fresh clean images "
                                            "per update, several after one flag (default 300)."),
    update_epochs: int = typer.Option(5, help="Epochs per update."),
    lr: float = typer.Option(0.01, help="Learning rate of a constant-LR update."),
    lr_schedule: list[str] = typer.Option(None, "--lr-schedule", help=f"{' | '.join(LR_SCHEDULES)}"
                                          " (repeatable; default: both); triangular = one "
                                          "cycle per update peaking at --fast-lr."),
    fast_lr: float = typer.Option(0.1, help="Peak of the triangular (fast-forgetting) LR."),
    source_epochs: int = typer.Option(20, help="Epochs of the poisoned source."),
    rate: float = typer.Option(0.1, help="BadNets poison rate of the source."),
    target: int = typer.Option(0, help="BadNets target class."),
    seeds: int = typer.Option(3, help="Seeds 0..N-1 (source, poisoned images, update data)."),
    device: str = DEVICE_OPTION,
    *,
    run: StudyRun,
) -> None:
    """Poison a model once (BadNets), update it again and again on drifting clean data, and
    follow the ASR after every update: per drift kind (class-prior shift, rotation), strength,
    update schedule and LR schedule, with 95% t-intervals over seeds.

    One run = one arm (seed, update schedule, drift kind, strength): resumable after
    `kill -9` or Ctrl-C (finished runs are kept), parallel with --workers or --executor ray;
    `robust-transfer report OUT` re-draws the figure from the results.
    """

    def build() -> SurvivalStudy:
        if seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {seeds}")
        return SurvivalStudy(
            task=task, checkpoint=checkpoint,
            backdoor=None if checkpoint is not None else BackdoorConfig("badnets", rate, target),
            source_epochs=source_epochs, drifts=tuple(drift or DRIFTS),
            strengths=tuple(strength or (0.0, 0.5, 1.0)), updates=n_updates,
            update_images=tuple(update_images or (300,)), update_epochs=update_epochs, lr=lr,
            lr_schedules=tuple(lr_schedule or LR_SCHEDULES), fast_lr=fast_lr,
            seeds=tuple(range(seeds)))

    study = run.study(SurvivalStudy.name, build)
    if run.saved(study):
        return
    out = require_out(out)
    run_with_progress(study, out, run, device, "runs", "poisoned sources")
    for path in make_survival_report(out, out):
        console.print(f"wrote {path}")
    print_table(f"backdoor survival after update {study.updates} (means over seeds; now: on "
                f"the current distribution; gone at: first update with ASR < {ASR_THRESHOLD:g}; "
                "95% intervals in survival_summary.md)",
                headline_rows(read_results(out, study.required)))
