"""Explanation commands (`explain saliency|influence|units`): parse, call `explain`, plot, print."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import typer

from robust_transfer.cli import app
from robust_transfer.cli.common import DEVICE_OPTION, check_output_dir, console, print_table
from robust_transfer.cli.studies import StudyRun, run_with_progress, study_options
from robust_transfer.errors import UserError, check_choice
from robust_transfer.explain.checkpoints import load_labelled, task_split
from robust_transfer.explain.loo import validate_leave_one_out
from robust_transfer.explain.saliency import METHODS as SALIENCY_METHODS
from robust_transfer.explain.saliency import saliency_for_checkpoints
from robust_transfer.explain.units import unit_analysis
from robust_transfer.models.runtime import resolve_device
from robust_transfer.report import explain_figures as figures
from robust_transfer.report.influence import class_match_summary, influence_report
from robust_transfer.studies.influence import InfluenceStudy

explain_app = typer.Typer(
    help="Explain what transfers: saliency maps, influence functions, unit analysis.",
    no_args_is_help=True,
)
app.add_typer(explain_app, name="explain")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


@explain_app.command()
def saliency(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint directories (one task)."),
    task: str = typer.Option(None, help="Task whose images to explain (default: the "
                             "checkpoints' own)."),
    split: str = typer.Option("test", help="Images from: test | train | all."),
    per_class: int = typer.Option(2, help="Images per class."),
    method: str = typer.Option("both", help="gradient | smoothgrad | both."),
    samples: int = typer.Option(25, help="SmoothGrad: noisy copies per image."),
    sigma: float = typer.Option(0.15, help="SmoothGrad: noise std (fraction of [0,1])."),
    threshold: float = typer.Option(0.3, help="Ink: pixels brighter than this."),
    seed: int = typer.Option(0, help="Seed for the image choice and SmoothGrad noise."),
    out: Path = typer.Option(Path("explain-saliency"), "--out", help="Output directory."),
    device: str = DEVICE_OPTION,
) -> None:
    """Loss-gradient maps of natural vs robust models on the same images (Fig. 4), and how
    much of the gradient mass lies on the digit's ink."""

    check_choice("saliency method", method, {*SALIENCY_METHODS, "both"})
    if per_class < 1:
        raise UserError(f"images per class must be >= 1, got {per_class}")
    check_output_dir(out, "--out")
    methods = SALIENCY_METHODS if method == "both" else (method,)
    comparison = saliency_for_checkpoints(
        [str(c) for c in checkpoints], task, split, per_class, methods, threshold, samples,
        sigma, seed, resolve_device(device),
    )
    png = figures.saliency_grid(comparison, out / "saliency.png")
    print_table("saliency mass on the digit's ink (per image, mean over images)",
                comparison.table())
    console.print(f"wrote {png}")


@explain_app.command()
@study_options()
def influence(
    paths: list[Path] = typer.Argument(None, help="Fine-tune directories, or source "
                                       "checkpoints to fine-tune first (grouped by source eps)."),
    validate: bool = typer.Option(False, "--validate", help="Check influence against "
                                  "leave-one-out retraining on a convex model (no input)."),
    method: str = typer.Option("exact", help="Inverse-HVP solver: exact | cg | lissa."),
    blocks: int = typer.Option(0, help="Parameters: head + this many last blocks."),
    damping: float = typer.Option(0.0, help="Extra Hessian damping on top of weight decay."),
    top_k: int = typer.Option(100, help="Largest k of the class-match curve."),
    examples: int = typer.Option(5, help="Training images shown per test image (Fig. 5)."),
    ranking: str = typer.Option("helpful", help="Rank by: helpful | harmful | abs."),
    targets_per_class: str = typer.Option("all", help="Test/training targets per class."),
    lissa_depth: int = typer.Option(1000, help="LiSSA recursion depth."),
    task: str = typer.Option("digits-5to9", "--task", help="Target task (sources only)."),
    images_per_class: str = typer.Option("all", help="Fine-tune images per class (sources)."),
    unfrozen_blocks: str = typer.Option("0", help="Fine-tuned blocks (sources)."),
    epochs: int = typer.Option(30, help="Fine-tuning epochs (sources)."),
    lr: float = typer.Option(0.1, help="Fine-tuning learning rate (sources)."),
    seeds: int = typer.Option(1, help="Fine-tune each source with seeds 0..N-1 (sources)."),
    removed: int = typer.Option(40, help="--validate: training images removed."),
    out: Path = typer.Option(Path("explain-influence"), "--out", help="Output directory "
                             "(fine-tunes under finetunes/, the runner's results, figures)."),
    device: str = DEVICE_OPTION,
    *,
    run: StudyRun,
) -> None:
    """Most influential training images per test image (Fig. 5) and how often they share its
    class, robust vs natural source (Fig. 6); or --validate against leave-one-out.

    A resumable study: source checkpoints are fine-tuned once (per seed) into
    OUT/finetunes/, each fine-tune's influence is one run; re-run into the same --out to
    finish a killed study; --workers / --executor ray run fine-tunes in parallel."""

    if validate:
        if paths:
            raise UserError("--validate runs on the embedded digits data; give no checkpoints")
        check_output_dir(out, "--out")
        console.print(f"leave-one-out validation: retraining {removed} times (L-BFGS) ...")
        result = validate_leave_one_out(num_removed=removed)
        png = figures.loo_scatter(result, out / "influence_validation.png")
        print_table("influence vs leave-one-out retraining (convex head, digits-5to9)", [{
            "removed images": len(result.removed), "training images": result.num_train,
            "test image": result.test_index, "Pearson r": result.pearson,
            "sign agreement": result.sign_agreement}])
        console.print(f"wrote {png}")
        return

    def build() -> InfluenceStudy:
        if not paths:
            raise UserError("give fine-tune directories or source checkpoints, or use "
                            "--validate")
        if seeds < 1:
            raise UserError(f"seeds must be >= 1, got {seeds}")
        return InfluenceStudy(tuple(p.resolve() for p in paths), method, blocks, damping,
                              top_k, examples, ranking, targets_per_class, lissa_depth, task,
                              images_per_class, unfrozen_blocks, epochs, lr,
                              tuple(range(seeds)))

    study = run.study(InfluenceStudy.name, build)
    if run.saved(study):
        return
    run_with_progress(study, out, run, device, "influence runs", "fine-tunes")
    written = influence_report(out, out)
    table = pd.read_parquet(written[-1])
    print_table("fraction of the top-k influential training images with the target's class",
                class_match_summary(table))
    console.print(f"wrote {', '.join(map(str, written))}")


@explain_app.command()
def units(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    layer: str = typer.Option("block3", help="block1..blockN or features."),
    top_k: int = typer.Option(9, help="Top images per unit / direction."),
    rows: int = typer.Option(4, help="Units and random directions shown in the grid."),
    split: str = typer.Option("test", help="Images ranked: test | train | all."),
    seed: int = typer.Option(0, help="Seed for the random directions."),
    out: Path = typer.Option(Path("explain-units"), "--out", help="Output directory."),
    device: str = DEVICE_OPTION,
) -> None:
    """Images that most activate single units vs random directions of a layer (Szegedy et
    al. 2014 sec. 3), and how class-pure their top-k lists are."""

    if rows < 1:
        raise UserError(f"rows must be >= 1, got {rows}")
    check_output_dir(out, "--out")
    (loaded,) = load_labelled([str(checkpoint)], None, resolve_device(device))
    images = task_split(loaded.task, split)
    analysis = unit_analysis(loaded.model, images, layer, top_k, seed)
    png = figures.units_grid(analysis, images.x, images.y, out / f"units_{_slug(layer)}.png", rows,
                     loaded.task.classes, title=f"{loaded.label}, layer {layer}: top-{top_k} "
                     f"{split} images per unit vs per random direction")
    print_table(f"unit analysis of {checkpoint} ({loaded.label})", [analysis.summary()])
    console.print(f"wrote {png}")
