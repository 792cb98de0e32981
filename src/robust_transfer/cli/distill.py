"""`robust-transfer distill`: knowledge, adversarially robust and defensive distillation.

Thin: checks the request (`train.distill_study.plan_distillation`) and `--out` before any
training, runs it with a progress bar, prints the tables, saves the student.
"""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.attacks import NORMS
from robust_transfer.cli import app
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    check_checkpoint_out,
    console,
    print_table,
    progress_bars,
)
from robust_transfer.models import save_checkpoint
from robust_transfer.models.runtime import resolve_device
from robust_transfer.train.distill import DISTILL_OBJECTIVES
from robust_transfer.train.distill_study import (
    CW_STEPS,
    EVAL_STEPS,
    DistillSettings,
    plan_distillation,
    run_distillation,
)

NORM_NAMES = " | ".join(NORMS)
KD_T, DEFENSIVE_T = (DISTILL_OBJECTIVES.options(n).temperature for n in ("kd", "defensive"))


@app.command()
def distill(
    teacher: Path = typer.Argument(..., help="Teacher checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Directory for the student checkpoint."),
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
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a checkpoint already in --out."),
) -> None:
    """Distil TEACHER into a student; compare student alone, distilled student and teacher.

    Reports clean accuracy and PGD-20 robust accuracy (with how much of the teacher's robust
    accuracy each student keeps and its KL to the teacher), and saves the distilled student
    (the ARD student with --adversarial). With --defensive the teacher is retrained at T on
    the teacher checkpoint's task and recipe, and a second table shows PGD on cross-entropy
    failing (vanishing gradients at T = 1, masking warnings) where the margin loss and CW
    break the model.
    """
    settings = DistillSettings(student, temperature, alpha, task, epochs, seed, adversarial,
                               defensive, eps, norm, attack_mode, ard_kl_scaling)
    plan = plan_distillation(teacher, settings)
    dev = resolve_device(device)
    check_checkpoint_out(out, overwrite)
    if plan.defensive_teacher is not None:
        r = plan.defensive_teacher
        console.print(f"defensive distillation: teacher {r.arch} retrained at T="
                      f"{plan.temperature:g} on {r.task} ({r.train.epochs} epochs, lr "
                      f"{r.train.lr:g}, no weight decay); student {student} on its soft "
                      "labels at T, deployed at T = 1")
    with progress_bars({name: n for name, n in plan.stages}) as advance:
        result = run_distillation(plan, dev, on_epoch=lambda name, _e: advance[name]())
    save_checkpoint(result.student, out, result.meta)
    robust = f"PGD-{EVAL_STEPS} {plan.norm} eps={plan.eps:g}"
    print_table(f"distillation (T={plan.temperature:g}, alpha={alpha:g}) on "
                f"{plan.students[plan.saved].task} test set", [
                    {"model": r["model"], "clean accuracy": r["clean"], robust: r["robust"],
                     "robustness kept": r["robust_kept"],
                     "KL to teacher (T=1)": r["kl_to_teacher"]}
                    for r in result.rows])
    if result.story:
        print_table(f"defensive distillation at T = 1: attacks at {plan.norm} "
                    f"eps={plan.eps:g} (CW-L2: {CW_STEPS} Adam steps per search step)", [
                        {"model": r["model"], "attack": r["attack"], "clean": r["clean"],
                         "robust": r["robust"], "success rate": r["success_rate"],
                         "masking warnings": len(r["warnings"])} for r in result.story])
        fired = sorted({w for r in result.story for w in r["warnings"]})
        for w in fired:
            console.print(f"gradient-masking warning: {w}")
    console.print(f"student ({plan.saved}) saved to {out}")
