"""`robust-transfer backdoor transfer SPEC --out DIR`: the backdoor-transfer study — a grid
whose sources carry backdoors (BadNets, NeuBA), the ASR of their triggers after every
fine-tuning epoch, and its report. Thin: the grid and the report do the work."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.cli.backdoor import backdoor_app
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    check_output_dir,
    console,
    print_outputs,
    print_table,
)
from robust_transfer.cli.studies import StudyRun, require_out, study_options
from robust_transfer.cli.study import run_grid_with_progress
from robust_transfer.errors import UserError
from robust_transfer.report.backdoor_transfer import backdoor_headline_rows, make_backdoor_report
from robust_transfer.report.study import make_report
from robust_transfer.transfer.grid import GridStudy, backdoor_spec_path
from robust_transfer.transfer.spec import load_spec, probes


@backdoor_app.command("transfer")
@study_options(spec=False, workers=2)
def transfer(
    spec_file: Path = typer.Argument(None, help="YAML grid spec whose `sources` carry "
                                     "`backdoor:` keys (default: the shipped "
                                     "specs/backdoor.yaml)."),
    out: Path = typer.Option(None, "--out", help="Directory for sources, results and report "
                             "(required unless --save-spec)."),
    device: str = DEVICE_OPTION,
    *,
    run: StudyRun,
) -> None:
    """Does a source's backdoor survive transfer? Run the grid, then the report.

    Trains the (poisoned / NeuBA-trojaned / clean) sources, fine-tunes each on the target
    task, records after every epoch the task-agnostic ASR of every backdoor's triggers (a clean
    source is the baseline), and draws ASR vs images per class and vs unfrozen blocks with 95%
    t-intervals over seeds, beside the usual accuracy figures. Resumable like `grid`.
    """
    spec_path = spec_file or backdoor_spec_path()
    spec = load_spec(spec_path)
    if not probes(spec):
        raise UserError(f"spec {str(spec_path)!r} has no backdoored source; give a `sources` "
                        "entry a key such as `backdoor: {attack: badnets, rate: 0.1, target: 0}`")
    if run.saved(GridStudy(spec)):
        return
    check_output_dir(require_out(out), "--out")
    console.print(f"spec: {spec_path}")
    table = run_grid_with_progress(spec, out, run, device)
    report = out / "report"
    rep = make_report(table, report)
    print_outputs([*rep.figures, *make_backdoor_report(table, report)])
    console.print(f"summary: {rep.summary}")
    print_table("final-epoch task-agnostic ASR (mean over seeds; CIs in backdoor_summary.md)",
                backdoor_headline_rows(table))
