"""`robust-transfer backdoor updates --out DIR`: does a one-shot backdoor survive periodic
model updates on drifting clean data (Li et al. 2022)? Thin: `backdoors.updates` runs the study,
`report.updates_figures` draws and summarises it."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.backdoors.source import recorded_backdoor
from robust_transfer.backdoors.updates import (
    LR_SCHEDULES,
    SurvivalConfig,
    run_survival,
    steps_total,
)
from robust_transfer.cli.backdoor import TASK_NAMES, backdoor_app
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    check_output_dir,
    console,
    print_table,
    progress_bar,
)
from robust_transfer.data.drift import DRIFTS
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.data.triggers import TRIGGERS
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint
from robust_transfer.models.runtime import resolve_device
from robust_transfer.report.common import save_table
from robust_transfer.report.updates_figures import (
    ASR_THRESHOLD,
    headline_rows,
    make_survival_report,
)

TABLE = "survival.parquet"


def _source(checkpoint: Path, task: str | None, device):
    """(model, task, backdoor) of a poisoned checkpoint; `UserError` if it is not one."""
    model, meta = load_checkpoint(checkpoint, device)
    backdoor = recorded_backdoor(meta)
    if backdoor.attack not in TRIGGERS:
        raise UserError(f"backdoor updates needs a data-poisoning backdoor ({', '.join(TRIGGERS)})"
                        f", the checkpoint has {backdoor.attack!r}")
    if task is not None and task != meta["task"]:
        raise UserError(f"--task {task!r} differs from the checkpoint's task {meta['task']!r}; "
                        "leave --task out with --checkpoint")
    return model, meta["task"], backdoor


@backdoor_app.command("updates")
def updates(
    out: Path = typer.Option(..., "--out", help="Directory for survival.parquet, the figure "
                             "and the summary."),
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
) -> None:
    """Poison a model once (BadNets), update it again and again on drifting clean data, and
    follow the ASR after every update: per drift kind (class-prior shift, rotation), strength,
    update schedule and LR schedule, with 95% t-intervals over seeds."""
    if seeds < 1:
        raise typer.BadParameter(f"--seeds must be >= 1, got {seeds}")
    dev = resolve_device(device)
    source, backdoor = None, BackdoorConfig("badnets", rate, target)
    if checkpoint is not None:
        source, task, backdoor = _source(checkpoint, task, dev)
    cfg = SurvivalConfig(task=task or "digits", backdoor=backdoor, source_epochs=source_epochs,
                         drifts=tuple(drift or DRIFTS),
                         strengths=tuple(strength or (0.0, 0.5, 1.0)), updates=n_updates,
                         update_images=tuple(update_images or (300,)),
                         update_epochs=update_epochs, lr=lr,
                         lr_schedules=tuple(lr_schedule or LR_SCHEDULES), fast_lr=fast_lr,
                         seeds=tuple(range(seeds)))
    if source is None:
        cfg.source(0)  # a bad task or target: now, before any training
    check_output_dir(out, "--out")
    total = steps_total(cfg, trained_sources=source is None)
    with progress_bar(f"{cfg.task}: poison once, update {n_updates}x", total) as advance:
        table = run_survival(cfg, dev, source, on_step=advance)
    paths = [save_table(table, out / TABLE), *make_survival_report(table, out)]
    for path in paths:
        console.print(f"wrote {path}")
    print_table(f"backdoor survival after update {cfg.updates} (means over seeds; now: on "
                f"the current distribution; gone at: first update with ASR < {ASR_THRESHOLD:g}; "
                "95% intervals in survival_summary.md)",
                headline_rows(table))
