"""`defend`: naive vs adaptive (BPDA / EOT) robust accuracy of input defenses on a checkpoint,
with the feature-squeezing detector's rates. Parses and checks every option before loading
or attacking; the algorithm is `defenses.compare_defenses` / `defenses.detection_rates`."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.atomic import atomic_write_text
from robust_transfer.attacks.registry import attack_class, names_help, stages
from robust_transfer.cli import app
from robust_transfer.cli.attack import DEFAULT_EPS, NORM_HELP, _attack_names, _check, _test_set
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    check_output_dir,
    checkpoint_task,
    console,
    out,
    print_table,
    progress_bar,
)
from robust_transfer.defenses import (
    compare_defenses,
    defenses_help,
    detection_rates,
    parse_defenses,
    squeezers_of,
)
from robust_transfer.defenses.evaluation import n_evaluations
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint
from robust_transfer.models.checkpoint import read_meta
from robust_transfer.models.runtime import resolve_device
from robust_transfer.report.defense_figures import defense_curves

CALIBRATION_IMAGES = 500


def _check_options(names, defenses, eot_samples: int, fpr: float) -> None:
    if eot_samples < 1:
        raise UserError(f"--eot-samples must be >= 1, got {eot_samples}")
    if not 0 <= fpr < 1:
        raise UserError(f"--fpr must be in [0, 1), got {fpr}")
    random = [d.label for d in defenses if any(t.randomized for t in d.transforms())]
    if random and eot_samples > 1:
        for stage in stages(names):
            if not attack_class(stage.attack).supports_eot:
                raise UserError(f"attack {stage.attack!r} cannot average gradients over the "
                                f"randomness of {', '.join(random)} (EOT); use pgd, fgsm, bim "
                                "or apgd-*, or --eot-samples 1")


@app.command("defend")
def defend(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    defense: list[str] = typer.Option(..., "--defense", help="Defenses, each evaluated on its "
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
    out_dir: Path = typer.Option(None, "--out", help="Directory for the figure and tables "
                                 "(default: defense-results/<checkpoint name>)."),
    seed: int = typer.Option(0, help="Seed for the attacks and the random defenses."),
    device: str = DEVICE_OPTION,
) -> None:
    """Clean, naive robust and adaptive robust accuracy per defense and eps, side by side,
    with the gradient-masking checks that fired; writes defenses.csv, detector.csv (when a
    squeezer is given) and defenses_vs_eps.png."""
    names = _attack_names(attack_names)
    defenses = parse_defenses(defense)
    if not eps:
        eps = [DEFAULT_EPS.get(norm, 0.1) * f for f in (0.5, 1, 2)]
    _check(names, norm, eps, n)
    _check_options(names, defenses, eot_samples, fpr)
    meta = read_meta(checkpoint)
    out_dir = out_dir or Path("defense-results") / Path(checkpoint).resolve().name
    check_output_dir(out_dir)
    task = checkpoint_task(meta, task, checkpoint)
    model, meta = load_checkpoint(checkpoint, resolve_device(device))
    data, x, y = _test_set(task, model.spec.num_classes, n)
    for spec in defenses:  # a bad canvas size for these images fails here, before attacking
        spec.build(model, seed)(x[:1].to(next(model.parameters()).device))
    total = n_evaluations(defenses, model) * len(eps) * len(stages(names, steps))
    with progress_bar(f"defend {checkpoint} ({', '.join(names)})", total) as advance:
        examples: dict = {}  # the undefended model's adversarial examples, for the detector
        table = compare_defenses(model, x, y, defenses, names, eps, norm, steps, seed,
                                 eot_samples, progress=advance, examples=examples)
    shown = [{"defense": r.defense, "eps": r.eps, "clean": r.clean_accuracy,
              "naive robust": r.naive_robust_accuracy,
              "adaptive robust": r.adaptive_robust_accuracy, "adaptive attack":
              r.adaptive_attack, "warnings (naive)": r.naive_warnings or "-",
              "warnings (adaptive)": r.adaptive_warnings or "-"} for r in table.itertuples()]
    print_table(f"{checkpoint} on {task} ({len(y)} test images, {', '.join(names)}, {norm})",
                shown)
    written = [out_dir / "defenses.csv"]
    atomic_write_text(written[0], table.to_csv(index=False))
    squeezers = squeezers_of(defenses)
    if squeezers:
        calib = data.train.x[:CALIBRATION_IMAGES]
        det = detection_rates(model, squeezers, calib, x, y, examples, fpr)
        print_table(f"feature-squeezing detector ({det['squeezers'].iloc[0]}; threshold at "
                    f"{fpr:.0%} false positives on {len(calib)} clean training images): "
                    "detection of successful adversarial examples of the undefended model",
                    [{"eps": r.eps, "threshold": r.threshold, "FPR calibration":
                      r.fpr_calibration, "FPR test": r.fpr_test, "adversarial": r.n_adversarial,
                      "detected": r.detection_rate} for r in det.itertuples()])
        written.append(out_dir / "detector.csv")
        atomic_write_text(written[-1], det.to_csv(index=False))
    written.append(defense_curves(table, out_dir / "defenses_vs_eps.png",
                                  title=f"{Path(checkpoint).name} on {task}: {', '.join(names)}"))
    console.print(f"{len(defenses)} defenses, {len(y)} test images of {task}")
    for path in written:
        out.print(f"wrote {path}")
