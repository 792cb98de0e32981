"""`certify`: randomized-smoothing certificates of a checkpoint (Cohen et al. 2019), with the
attack's upper bound beside them; `certify-transfer`: the study of whether a certificate
transfers (a grid with a `certify:` section, then its report). Parses and checks every option
before loading anything; the algorithms are `certify.certify_dataset` and the grid, the
figures `report.certify_figures` / `report.certify_transfer`."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.atomic import atomic_write_text
from robust_transfer.certify import EmpiricalAttack, certify_dataset, check_budget
from robust_transfer.certify.evaluate import check_radii, check_sigmas, spread
from robust_transfer.certify.metrics import table_radii
from robust_transfer.cli import app
from robust_transfer.cli.attack import _test_set
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    check_output_dir,
    checkpoint_task,
    console,
    out,
    print_outputs,
    print_table,
    progress_bar,
)
from robust_transfer.cli.studies import StudyRun, require_out, study_options
from robust_transfer.cli.study import run_grid_with_progress
from robust_transfer.errors import UserError
from robust_transfer.models import load_checkpoint, read_card
from robust_transfer.models.runtime import resolve_device
from robust_transfer.report.certify_figures import certified_accuracy_plot
from robust_transfer.report.certify_transfer import certify_headline_rows, make_certify_report
from robust_transfer.report.study import make_report
from robust_transfer.transfer.certify_study import certify_sources, certify_spec_path
from robust_transfer.transfer.grid import GridStudy
from robust_transfer.transfer.results import read_results, writer_lock
from robust_transfer.transfer.spec import load_spec

RADII_HELP = ("L2 radii of the table (repeatable; default: Cohen et al.'s CIFAR-10 radii 0, "
              "0.25, 0.5, 0.75, 1.0 times (d / 3072)^(1/4) for d input values: as published "
              "at 3x32x32, x0.38 on 8x8 digits, x2.65 at 3x224x224).")


def _check_options(sigma: list[float], n0: int, n: int, alpha: float, max_images: int,
                   batch_size: int) -> list[float]:
    sigma = check_sigmas(sigma)
    check_budget(n0, n, alpha)
    if max_images < 1:
        raise UserError(f"--max-images must be >= 1, got {max_images}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    return sigma


@app.command("certify")
def certify(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    sigma: list[float] = typer.Option(..., "--sigma", help="Noise level(s) of the smoothed "
                                      "classifier, in pixel units (repeatable)."),
    n0: int = typer.Option(100, "--n0", help="Noise draws to select the class."),
    n: int = typer.Option(100_000, "--n", help="Noise draws to estimate its probability "
                          "(the paper's 100,000; --n 10000 certifies 500 digits in minutes "
                          "on 2 CPU cores)."),
    alpha: float = typer.Option(0.001, "--alpha", help="Failure probability of each "
                                "certificate, in (0, 1)."),
    max_images: int = typer.Option(500, "--max-images", help="Test images to certify: every "
                                   "k-th of the test set, k = its size // max-images (Cohen "
                                   "et al. certify every 20th CIFAR-10 test image)."),
    radius: list[float] = typer.Option(None, "--radius", help=RADII_HELP),
    attack_steps: int = typer.Option(10, "--attack-steps", help="PGD-L2 steps of the attack "
                                     "on the smoothed soft classifier (upper bound)."),
    noise_samples: int = typer.Option(4, "--noise-samples", help="Noise draws per forward "
                                      "pass of the attacked soft classifier (Salman et al.'s m)."),
    eot_samples: int = typer.Option(2, "--eot-samples", help="Forward passes averaged per "
                                    "attack gradient (EOT)."),
    attack_n: int = typer.Option(500, "--attack-n", help="Noise draws of the smoothed "
                                 "classifier's majority vote on attacked images."),
    no_attack: bool = typer.Option(False, "--no-attack", help="Certify only; skip the "
                                   "attack's upper bound."),
    batch_size: int = typer.Option(1000, "--batch-size", help="Noisy images per forward pass."),
    seed: int = typer.Option(0, help="Seed of the noise draws and of the attack."),
    task: str = typer.Option(None, help="Task (default: the checkpoint's)."),
    out_dir: Path = typer.Option(None, "--out", help="Directory for certify.csv, "
                                 "certify_summary.csv and certified_accuracy.png (default: "
                                 "certify-results/ + the checkpoint directory name)."),
    device: str = DEVICE_OPTION,
) -> None:
    """Certified L2 robustness by randomized smoothing (Cohen, Rosenfeld & Kolter 2019).

    For each sigma: CERTIFY every image (class on n0 draws, Clopper-Pearson lower bound of its
    probability on n draws, radius sigma * PhiInv(pA), abstain when pA <= 1/2). Prints the
    approximate certified accuracy at the table radii beside the accuracy of the smoothed
    classifier under PGD-L2 with EOT on its soft version (Salman et al. 2019) at the same radii
    (lower and upper bound of its robust accuracy), the average certified radius (ACR), the
    abstention rate and the base model's accuracy under noise. Writes certify.csv (one row per
    image and sigma), certify_summary.csv and certified_accuracy.png.
    """
    attack = None if no_attack else EmpiricalAttack(attack_steps, noise_samples, eot_samples,
                                                    attack_n)
    sigma = _check_options(sigma, n0, n, alpha, max_images, batch_size)
    radii = None if not radius else check_radii(radius)
    read_card(checkpoint)  # a missing or corrupt checkpoint: reported before a bad --out
    out_dir = out_dir or Path("certify-results") / Path(checkpoint).resolve().name
    check_output_dir(out_dir)
    model, card = load_checkpoint(checkpoint, resolve_device(device))
    task = checkpoint_task(card, task, checkpoint)
    data, _, _ = _test_set(task, model.spec.num_classes, 1)
    pick = spread(len(data.test.y), max_images)
    x, y = data.test.x[pick], data.test.y[pick]
    radii = radii or table_radii(x.shape[1:])
    total = len(y) * len(sigma) * (1 if attack is None else 2)
    with progress_bar(f"certify {checkpoint} (n={n:,})", total) as advance:
        result = certify_dataset(model, x, y, sigma, model.spec.num_classes, n0, n, alpha,
                                 radii, batch_size, seed, attack, progress=advance)
    summary = result.summary
    rows = []
    for s, df in summary.groupby("sigma", sort=True):
        row = {"sigma": f"{s:g}"}
        for r in df.itertuples():
            upper = "" if no_attack else f"/{r.empirical_accuracy:.3f}"
            row[f"r={r.radius:g}"] = f"{r.certified_accuracy:.3f}{upper}"
        rows.append(row)
    what = "certified" if no_attack else "certified/PGD+EOT"
    print_table(f"{Path(checkpoint).name} on {task} ({len(y)} images, n0={n0}, n={n:,}, "
                f"alpha={alpha:g}): {what} accuracy at L2 radius", rows)
    first = summary.groupby("sigma", sort=True).first().reset_index()
    print_table("per sigma", [{"sigma": f"{r.sigma:g}", "ACR": r.acr, "abstain": r.abstain_rate,
                               "base acc. under noise": r.noise_accuracy,
                               "base acc. clean": r.clean_accuracy}
                              for r in first.itertuples()])
    written = [out_dir / "certify.csv", out_dir / "certify_summary.csv"]
    atomic_write_text(written[0], result.images.to_csv(index=False))
    atomic_write_text(written[1], summary.to_csv(index=False))
    written.append(certified_accuracy_plot(
        result.images, summary, out_dir / "certified_accuracy.png",
        title=f"{Path(checkpoint).name} on {task}: {len(y)} images, n={n:,}, α={alpha:g}"))
    console.print(f"{len(sigma)} sigma(s), {len(y)} test images of {task}")
    for path in written:
        out.print(f"wrote {path}")


@app.command("certify-transfer")
@study_options(spec=False, workers=2)
def certify_transfer(
    spec_file: Path = typer.Argument(None, help="YAML grid spec with a `certify:` section "
                                     "(default: the shipped specs/certify.yaml)."),
    out_dir: Path = typer.Option(None, "--out", help="Directory for sources, results and "
                                 "report (required unless --save-spec)."),
    device: str = DEVICE_OPTION,
    *,
    run: StudyRun,
) -> None:
    """Does a certificate transfer? Run the grid, certify, then the report.

    Trains the sources (e.g. natural, PGD-AT, Gaussian augmentation, SmoothAdv), fine-tunes
    each on the target task, certifies every final model by randomized smoothing at the
    spec's sigma (and each source on its own task), and writes Figure C1 (certified accuracy
    vs L2 radius, 95% t-intervals over seeds) and certify_summary.md (certified accuracy per
    radius, ACR, paired ACR difference to the natural source) beside the usual accuracy
    report. Resumable like `grid`.
    """
    spec_path = spec_file or certify_spec_path()
    spec = load_spec(spec_path)
    if spec.certify is None:
        raise UserError(f"spec {str(spec_path)!r} has no certify: section; add e.g. "
                        "`certify: {sigma: 0.25, n: 1000, max_images: 200}`")
    if run.saved(GridStudy(spec)):
        return
    check_output_dir(require_out(out_dir), "--out")
    resolve_device(device)  # before the writer lock creates --out
    console.print(f"spec: {spec_path}")
    with writer_lock(out_dir):  # the sources' certificates and the report too, as demo
        table = run_grid_with_progress(spec, out_dir, run, device)
        sources = certify_sources(spec, out_dir, device)
        report = out_dir / "report"
        atomic_write_text(report / "source_certify.csv", sources.to_csv(index=False))
        rep = make_report(table, report)
        results = read_results(table)
        figures = [*rep.figures, *make_certify_report(results, sources, report)]
    print_outputs(figures)
    console.print(f"summary: {rep.summary}")
    print_table(f"mean ACR at σ={spec.certify.sigma:g} (CIs in certify_summary.md)",
                certify_headline_rows(results))
