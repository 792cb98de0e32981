"""`robust-transfer bias-transfer --out DIR`: the bias-transfer study (Salman et al. 2022,
arXiv 2207.02842). Thin: build the spec (`studies.bias.BiasStudy`) from the options or
--spec, run it on the one runner (`cli.studies.run_with_progress`), write
`report.bias_figures`' report, print."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from robust_transfer.cli import app
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    console,
    plugin_options_flag,
    print_table,
    split_values,
)
from robust_transfer.cli.studies import StudyRun, require_out, run_with_progress, study_options
from robust_transfer.data import TASKS
from robust_transfer.data.triggers import TRIGGERS
from robust_transfer.errors import UserError
from robust_transfer.models.nets import ARCHS
from robust_transfer.plugins import parse_assignments
from robust_transfer.report.bias_figures import make_bias_report
from robust_transfer.studies.bias import MODES, TARGET_DATA, BiasStudy


@app.command("bias-transfer")
@study_options()
def bias_transfer(
    out: Path = typer.Option(None, "--out", help="Directory for the source models, results, "
                             "summary and figure (required unless --save-spec)."),
    source_task: str = typer.Option("digits-0to4", help=f"Source task: {', '.join(TASKS)}."),
    target_task: str = typer.Option("digits-5to9", help="Target task (without the feature), "
                                    "from the same list."),
    arch: str = typer.Option("cnn-small", help=f"Source architecture: {' | '.join(ARCHS)}."),
    bias_class: list[int] = typer.Option(None, "--bias-class", help="Source class whose every "
                                         "training image gets the feature, labels kept "
                                         "(repeatable; default: 0)."),
    feature: str = typer.Option("blended", help=f"The spurious feature: {' | '.join(TRIGGERS)}"
                                " (blended: a fixed random pattern at alpha 0.2; badnets: a "
                                "white square in the corner; options: --trigger-option)."),
    patch_size: int = typer.Option(None, help="BadNets square side (default: scaled to the "
                                   "image, 2 on 8x8, 3 on 32x32)."),
    trigger_option: list[str] = plugin_options_flag("--trigger-option", "the feature's "
                                                    "trigger", TRIGGERS),
    seeds: int = typer.Option(5, help="Number of seeds (0..N-1); each trains a biased and a "
                              "clean source."),
    images_per_class: list[str] = typer.Option(
        None, "--images-per-class", help="Images per class (repeat or comma-separate; 'all' = "
        "every image). Default: 1,5,25,all."),
    mode: list[str] = typer.Option(None, "--mode", help=f"{' | '.join(MODES)} (repeatable; "
                                   "default: both). fixed = head only, full = all blocks."),
    target_data: list[str] = typer.Option(None, "--target-data", help=f"{' | '.join(TARGET_DATA)}"
                                          " (repeatable; default: both)."),
    debias_share: float = typer.Option(0.5, help="De-biased target: share of every class's "
                                       "training images that get the feature."),
    source_epochs: int = typer.Option(20, help="Source training epochs."),
    epochs: int = typer.Option(10, help="Fine-tuning epochs."),
    lr: float = typer.Option(0.1, help="Fine-tuning learning rate (step schedule)."),
    device: str = DEVICE_OPTION,
    *,
    run: StudyRun,
) -> None:
    """Does a spurious feature planted in the source move the target model's predictions?

    Per seed, trains a source with the feature on every image of one class and a clean one,
    fine-tunes both (fixed-feature and full, on the standard and on a de-biased target
    training set, at each number of images per class), and measures how far adding the
    feature to target test images moves predictions towards one class. Writes the sources
    (sources/), one results part per fine-tune (results/, results.parquet), spec.yaml,
    bias_summary.csv/.md and bias_shift.png into --out. Resumable: re-run the same command
    (or `robust-transfer run OUT/spec.yaml --out OUT`) and only the missing runs run.
    """

    def build() -> BiasStudy:
        if seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {seeds}")
        defaults = BiasStudy.__dataclass_fields__
        return BiasStudy(
            source_task=source_task, target_task=target_task, source_arch=arch,
            bias_classes=tuple(bias_class or (0,)),
            feature=feature, patch_size=patch_size, seeds=tuple(range(seeds)),
            trigger_options=parse_assignments(trigger_option or [], "--trigger-option"),
            images_per_class=(tuple(split_values(images_per_class))
                              or defaults["images_per_class"].default),
            modes=tuple(split_values(mode)) or defaults["modes"].default,
            target_data=tuple(split_values(target_data)) or defaults["target_data"].default,
            debias_share=debias_share, source_epochs=source_epochs, epochs=epochs, lr=lr)

    study = run.study(BiasStudy.name, build)
    if run.saved(study):
        return
    out = require_out(out)
    table = run_with_progress(study, out, run, device, "fine-tunes", "source models")
    figure, csv, md = make_bias_report(out, out)
    console.print(f"table: {table}\nsummary: {csv}, {md}\nfigure: {figure}")
    print_table("prediction shift and flip rate towards one class (mean ± 95% t half-width "
                "over seeds)",
                summary_rows(pd.read_csv(csv)))


def _pm(mean: float, ci: float) -> str:
    return f"{mean:.3f}" + ("" if pd.isna(ci) else f" ± {ci:.3f}")


def summary_rows(summary: pd.DataFrame) -> list[dict]:
    """The printed summary (`report.bias_figures.bias_summary`), as text cells."""
    return [{"target": r.target_data, "mode": r.mode, "images/class": r.images_per_class,
             "biased": _pm(r.biased_shift, r.biased_shift_ci),
             "clean": _pm(r.clean_shift, r.clean_shift_ci),
             "biased − clean": _pm(r.difference, r.difference_ci),
             "flip rate biased": _pm(r.biased_flip, r.biased_flip_ci),
             "flip rate clean": _pm(r.clean_flip, r.clean_flip_ci), "n": r.n}
            for r in summary.itertuples()]
