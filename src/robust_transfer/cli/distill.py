"""`robust-transfer distill`: knowledge, adversarially robust and defensive distillation.

Thin: the options build the study's spec (`studies.distill.DistillStudy`, checked before any
training), the one runner trains the students and measures every model, and
`report.distill` makes the tables it prints and the summary it writes.
"""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.attacks import NORMS
from robust_transfer.cli import app
from robust_transfer.cli.common import DEVICE_OPTION, console, print_table
from robust_transfer.cli.studies import StudyRun, require_out, run_with_progress, study_options
from robust_transfer.errors import UserError
from robust_transfer.report.distill import (
    comparison_rows,
    comparison_title,
    make_distill_report,
    robust_label,
    story_rows,
    story_title,
)
from robust_transfer.studies.distill import DistillStudy
from robust_transfer.train.distill import DISTILL_OBJECTIVES
from robust_transfer.transfer.results import read_results

NORM_NAMES = " | ".join(NORMS)
KD_T, DEFENSIVE_T = (DISTILL_OBJECTIVES.options(n).temperature for n in ("kd", "defensive"))


@app.command()
@study_options()
def distill(
    teacher: Path = typer.Argument(None, metavar="TEACHER", help="Teacher checkpoint "
                                   "directory (optional with --spec)."),
    out: Path = typer.Option(None, "--out", help="Directory for the study: the students' "
                             "checkpoints (sources/), results and spec, and the summary."),
    student: str = typer.Option("cnn-small", "--student", help="Student arch: cnn-small | "
                                "cnn-medium."),
    temperature: float = typer.Option(None, "--temperature", help="Softmax temperature T "
                                      f"(default {KD_T:g}; {DEFENSIVE_T:g} with --defensive)."),
    alpha: float = typer.Option(0.9, "--alpha", help="Weight of the distillation (KL) term; "
                                "1 - alpha weights cross-entropy on the labels."),
    task: str = typer.Option(None, "--task", help="Task to distil on (default: the "
                             "teacher's)."),
    epochs: int = typer.Option(None, "--epochs", help="Training epochs (default: the "
                               "teacher's recipe)."),
    seed: int = typer.Option(None, "--seed", help="Students' seed (initialisation, shuffling, "
                             "attacks; default: the teacher's + 1, so that the student alone "
                             "is not a replica of the teacher)."),
    adversarial: bool = typer.Option(False, "--adversarial", help="Also train an ARD student "
                                     "(Goldblum et al. 2020) on its PGD examples at --eps."),
    defensive: bool = typer.Option(False, "--defensive", help="Defensive distillation "
                                   "(Papernot et al. 2016): teacher retrained at T, student on "
                                   "its soft labels at T, deployed at T = 1."),
    eps: float = typer.Option(None, "--eps", help="Radius of ARD and of the robust-accuracy "
                              "column (default: the teacher's, else 1.0 for L2)."),
    norm: str = typer.Option(None, "--norm", help=f"Threat model: {NORM_NAMES} (default: the "
                             "teacher's, else l2)."),
    attack_mode: str = typer.Option(None, "--attack-mode", help="ARD: eval | train, the "
                                    "student's mode while its PGD examples are made (default: "
                                    "train, as Goldblum et al.'s code)."),
    ard_kl_scaling: str = typer.Option("paper", "--ard-kl-scaling", help="ARD's KL term: "
                                       "paper (summed over classes, mean over examples) | "
                                       "code (the ARD code's KLDivLoss 'mean': also / K "
                                       "classes)."),
    device: str = DEVICE_OPTION,
    *,
    run: StudyRun,
) -> None:
    """Distil TEACHER into a student; compare student alone, distilled student and teacher.

    Reports clean accuracy and PGD-20 robust accuracy (with how much of the teacher's robust
    accuracy each student keeps and its KL to the teacher), and saves the distilled student
    (the ARD student with --adversarial). With --defensive the teacher is retrained at T on
    the teacher checkpoint's task and recipe, and a second table shows PGD on cross-entropy
    failing (vanishing gradients at T = 1, masking warnings) where the margin loss and CW
    break the model.

    The students are trained once each (kept in OUT/sources/, the teacher's weights hash in
    their ids) and every measurement is one run: resumable after `kill -9` or Ctrl-C,
    parallel with --workers or --executor ray; `robust-transfer report OUT` rewrites the
    summary.
    """

    def build() -> DistillStudy:
        if teacher is None:
            raise UserError("give the TEACHER checkpoint (or --spec FILE)")
        return DistillStudy(teacher, student, temperature, alpha, task, epochs, seed,
                            adversarial, defensive, eps, norm, attack_mode, ard_kl_scaling)

    study = run.study(DistillStudy.name, build)
    if run.saved(study):
        return
    out = require_out(out)
    plan = study.plan()
    if plan.retrained is not None:
        r = plan.retrained
        console.print(f"defensive distillation: teacher {r.arch} retrained at T="
                      f"{study.temperature:g} on {r.task} ({r.train.epochs} epochs, lr "
                      f"{r.train.lr:g}, no weight decay); student {study.student} on its soft "
                      "labels at T, deployed at T = 1")
    run_with_progress(study, out, run, device, "measurements", "models")
    for path in make_distill_report(out, out):
        console.print(f"wrote {path}")
    table = read_results(out, study.required)
    print_table(comparison_title(table), [
        {"model": r["model"], "clean accuracy": r["clean"], robust_label(table): r["robust"],
         "robustness kept": r["robust_kept"], "KL to teacher (T=1)": r["kl_to_teacher"]}
        for r in comparison_rows(table)])
    story = story_rows(table)
    if story:
        print_table(story_title(table), [
            {"model": r["model"], "attack": r["attack"], "clean": r["clean"],
             "robust": r["robust"], "success rate": r["success_rate"],
             "masking warnings": len(r["warnings"])} for r in story])
        for w in sorted({w for r in story for w in r["warnings"]}):
            console.print(f"gradient-masking warning: {w}")
    console.print(f"student ({plan.kept}) saved to {study.models(out)[plan.kept]}",
                  soft_wrap=True)
