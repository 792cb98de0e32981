"""`defend`: naive vs adaptive (BPDA / EOT) robust accuracy of input defenses on a checkpoint,
with the feature-squeezing detector's rates. Builds the `defend` study (`studies.defend`,
checked whole before loading or attacking), runs it resumably on the shared runner and writes
its report (`report.defense_figures.defend_report`)."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.attacks.registry import names_help
from robust_transfer.cli import app
from robust_transfer.cli.attack import NORM_HELP, _attack_names
from robust_transfer.cli.common import DEVICE_OPTION, console, out, print_table
from robust_transfer.cli.studies import StudyRun, run_with_progress, study_options
from robust_transfer.defenses import defenses_help
from robust_transfer.errors import UserError
from robust_transfer.report.defense_figures import defend_report, defend_tables
from robust_transfer.studies.defend import CALIBRATION_IMAGES, DefendStudy


@app.command("defend")
@study_options()
def defend(
    checkpoint: Path = typer.Argument(None, help="Checkpoint directory (not needed with "
                                      "--spec)."),
    defense: list[str] = typer.Option(None, "--defense", help="Defenses, each evaluated on its "
                                      f"own, e.g. squeeze-bits:4,median:2,random-resize. "
                                      f"{defenses_help()}."),
    attack_names: list[str] = typer.Option(["pgd"], "--attack", help="Attack or cascade "
                                           f"(comma-separated for a worst case); {names_help()}."),
    norm: str = typer.Option("linf", help=f"Threat model: {NORM_HELP}."),
    eps: list[float] = typer.Option(None, "--eps", help="Radii in pixel space (default: half, "
                                    "one and two times 0.1 linf / 0.5 l2 / 2.0 l1)."),
    steps: int = typer.Option(None, help="Iterations of every attack (default: the attack's)."),
    eot_samples: int = typer.Option(30, "--eot-samples", help="Draws of a random defense per "
                                    "gradient in the adaptive attack (EOT; Xie et al. ~30)."),
    fpr: float = typer.Option(0.05, help="False-positive rate on clean data at which the "
                              "squeeze detector's threshold is chosen."),
    n: int = typer.Option(200, "--n", help="Number of test images."),
    task: str = typer.Option(None, help="Task (default: the checkpoint's)."),
    out_dir: Path = typer.Option(None, "--out", help="Directory for the results, figure and "
                                 "tables (default: defense-results/CHECKPOINT_NAME)."),
    seed: int = typer.Option(0, help="Seed for the attacks and the random defenses."),
    device: str = DEVICE_OPTION,
    *,
    run: StudyRun,
) -> None:
    """Clean, naive robust and adaptive robust accuracy per defense and eps, side by side,
    with the gradient-masking checks that fired; writes defenses.csv, detector.csv (when a
    squeezer is given) and defenses_vs_eps.png.

    One run per defense (and one for the detector), resumable: re-run into the same --out
    to finish a killed study; --workers / --executor ray run defenses in parallel."""

    def build() -> DefendStudy:
        if checkpoint is None:
            raise UserError("give a checkpoint directory (or --spec FILE)")
        if not defense:
            raise UserError(f"give --defense (or --spec FILE); {defenses_help()}")
        return DefendStudy(checkpoint.resolve(), tuple(defense),
                           tuple(_attack_names(attack_names)), norm, tuple(eps or ()), steps,
                           eot_samples, fpr, n, task, seed)

    study = run.study(DefendStudy.name, build)
    if run.saved(study):
        return
    out_dir = out_dir or Path("defense-results") / study.checkpoint.resolve().name
    run_with_progress(study, out_dir, run, device, "runs", "artifacts")
    table, det = defend_tables(out_dir)
    names = ", ".join(study.attacks)
    shown = [{"defense": r.defense, "eps": r.eps, "clean": r.test_accuracy,
              "naive robust": r.naive_robust_accuracy,
              "adaptive robust": r.adaptive_robust_accuracy, "adaptive attack":
              r.adaptive_attack, "warnings (naive)": r.naive_warnings or "-",
              "warnings (adaptive)": r.adaptive_warnings or "-"} for r in table.itertuples()]
    print_table(f"{study.checkpoint} on {study.task_name()} ({study.n} test images, {names}, "
                f"{study.norm})", shown)
    if len(det):
        print_table(f"feature-squeezing detector ({det['squeezers'].iloc[0]}; threshold at "
                    f"{study.fpr:.0%} false positives on {CALIBRATION_IMAGES} clean training "
                    "images): detection of successful adversarial examples of the undefended "
                    "model",
                    [{"eps": r.eps, "threshold": r.threshold, "FPR calibration":
                      r.fpr_calibration, "FPR test": r.fpr_test, "adversarial": r.n_adversarial,
                      "detected": r.detection_rate} for r in det.itertuples()])
    written = defend_report(out_dir, out_dir)
    console.print(f"{len(study.defenses)} defenses, the first {study.n} test images of "
                  f"{study.task_name()}")
    for path in written:
        out.print(f"wrote {path}")
