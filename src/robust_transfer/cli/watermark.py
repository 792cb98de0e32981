"""Watermark commands (Adi et al. 2018, watermarking by backdooring): `watermark embed` (train a
source with a secret trigger set; the key is written apart from the checkpoint), `watermark
verify` (trigger-set accuracy, chance, p-value, OWNED / NOT OWNED) and `watermark remove` (the
removal study, `studies.watermark`: FTLL / FTAL / RTLL / RTAL and transfer, on the one
runner; Parquet table, figure, printed table). Thin: parse, validate, call
`backdoors.watermark` / `studies.watermark`, print."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from robust_transfer.backdoors.watermark import (
    ALPHA,
    ATTACKS,
    KEY_META,
    KEY_WEIGHTS,
    PERMUTATIONS,
    check_key_apart,
    check_key_images,
    check_model_fits,
    load_key,
    make_key,
    save_key,
    train_watermarked,
    transfer_verify,
    verify,
)
from robust_transfer.cli import app
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    check_checkpoint_out,
    check_output_dir,
    console,
    print_table,
    progress_bar,
)
from robust_transfer.cli.studies import StudyRun, require_out, run_with_progress, study_options
from robust_transfer.data import TASKS, load_task
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import load_checkpoint, save_checkpoint
from robust_transfer.models.runtime import resolve_device
from robust_transfer.report.watermark_figures import (
    FIGURE,
    TABLE,
    watermark_report,
    watermark_summary,
)
from robust_transfer.studies.watermark import WatermarkRemoval
from robust_transfer.train import SourceConfig, TrainConfig

watermark_app = typer.Typer(help="Watermarking by backdooring (Adi et al. 2018): embed a secret "
                            "trigger set, verify ownership, try to remove it.",
                            no_args_is_help=True)
app.add_typer(watermark_app, name="watermark")

TESTS = ("auto", "binomial", "permutation")
KEY_OPTION = typer.Option(..., "--key", help="The watermark key directory (key.safetensors + "
                          "key.json), kept apart from any checkpoint.")


def _verdict(v: dict) -> str:
    return "OWNED" if v["owned"] else "NOT OWNED"


@watermark_app.command("embed")
def embed(
    out: Path = typer.Option(..., "--out", help="Directory for the watermarked checkpoint."),
    key: Path = KEY_OPTION,
    task: str = typer.Option("digits-0to4", help=f"Source task: {', '.join(TASKS)}."),
    arch: str = typer.Option("cnn-small", help="cnn-small (8x8) | cnn-medium (32x32) | ..."),
    epochs: int = typer.Option(30, help="Training epochs."),
    lr: float = typer.Option(0.1, help="SGD learning rate."),
    trigger_size: int = typer.Option(100, help="Trigger images in the key (the paper: 100)."),
    repeats: int = typer.Option(8, help="Times each trigger image is seen per epoch."),
    seed: int = typer.Option(0, help="Seed for initialisation and shuffling."),
    key_seed: int = typer.Option(None, help="Seed of the trigger images and labels "
                                 "(default: --seed)."),
    device: str = DEVICE_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a checkpoint or key already there."),
) -> None:
    """Train a source with a secret trigger set (abstract images, random labels) in every
    batch; save the checkpoint to --out and the key to --key; print the verification."""
    check_key_apart(key, out)
    cfg = SourceConfig(task=task, arch=arch, train=TrainConfig(epochs=epochs, lr=lr, seed=seed))
    if trigger_size < 1 or repeats < 1:
        raise UserError(f"--trigger-size and --repeats must be >= 1, got {trigger_size}, "
                        f"{repeats}")
    check_checkpoint_out(out, overwrite)
    check_output_dir(key, "--key")
    if not overwrite and any((key / f).exists() for f in (KEY_WEIGHTS, KEY_META)):
        raise UserError(f"--key {str(key)!r} already holds a key; pass --overwrite to replace "
                        "it, or choose another directory")
    dev = resolve_device(device)
    t = load_task(task)
    wm_key = make_key(t.num_classes, t.input_shape, trigger_size,
                      seed if key_seed is None else key_seed)
    with progress_bar(f"train {task} with a {trigger_size}-image trigger set", epochs) as advance:
        model, card = train_watermarked(cfg, wm_key, repeats, dev, lambda _e: advance())
    save_key(wm_key, key, {"task": task})
    save_checkpoint(model, out, card)
    m = card.metrics
    console.print(f"checkpoint: {out}\nkey: {key} (keep it apart from the model)")
    print_table("watermarked source", [{
        "model": str(out), "test accuracy": m["clean_accuracy"],
        "trigger accuracy": m["trigger_accuracy"], "chance": m["chance"],
        "p-value": f"{m['p_value']:.3g}", "verdict": _verdict({"owned": m["p_value"] < ALPHA})}])


@watermark_app.command("verify")
def verify_command(
    checkpoint: Path = typer.Argument(..., help="A checkpoint to test for the watermark."),
    key: Path = KEY_OPTION,
    alpha: float = typer.Option(ALPHA, help="Ownership is claimed when p < alpha."),
    test: str = typer.Option("auto", help="binomial (trigger accuracy vs 1/K, the model's "
                             "classes are the key's) | permutation (after transfer to another "
                             "task) | auto (binomial when the model's task is the key's)."),
    permutations: int = typer.Option(PERMUTATIONS, help="Permutations of the permutation test."),
    device: str = DEVICE_OPTION,
) -> None:
    """Black-box ownership test: the model's accuracy on the key's trigger set against chance,
    its p-value, and the verdict (exit 0 either way)."""
    check_choice("test", test, TESTS)
    check_key_apart(key, checkpoint)
    wm_key, key_meta = load_key(key)
    model, card = load_checkpoint(checkpoint, resolve_device(device))
    check_key_images(model, wm_key)
    same_task = (model.spec.num_classes == wm_key.num_classes
                 and card.task in (None, key_meta.get("task")))
    if test == "binomial" or (test == "auto" and same_task):
        check_model_fits(model, wm_key)
        v = {**verify(model, wm_key, alpha), "verification": "binomial"}
        what = "trigger accuracy"
    else:
        v = transfer_verify(model, wm_key, alpha, permutations)
        what = "mapped trigger accuracy"
    print_table(f"watermark verification ({v['verification']} test, alpha {alpha:g})", [{
        "model": str(checkpoint), what: v["trigger_accuracy"], "chance": v["chance"],
        "p-value": f"{v['p_value']:.3g}", "verdict": _verdict(v)}])


@watermark_app.command("remove")
@study_options()
def remove_command(
    checkpoint: Path = typer.Argument(None, help="A watermarked checkpoint (watermark embed); "
                                      "not with --spec (the spec names it)."),
    key: Path = typer.Option(None, "--key", help="The watermark key directory (key.safetensors "
                             "+ key.json), kept apart from any checkpoint; not with --spec."),
    out: Path = typer.Option(None, "--out", help=f"Directory for the independent model, the "
                             f"results, {TABLE} and {FIGURE} (needed unless --save-spec)."),
    attack: list[str] = typer.Option(None, "--attack", help=f"{' | '.join(ATTACKS)} "
                                     "(repeatable; default: all)."),
    transfer_task: str = typer.Option("digits-5to9", help="Task to transfer to, or 'none'."),
    transfer_blocks: list[str] = typer.Option(None, "--transfer-blocks", help="Unfrozen blocks "
                                              "of a transfer: int or 'all' (repeatable; "
                                              "default: 0, 1, all)."),
    transfer_shots: str = typer.Option("all", help="Target images per class, or 'all'."),
    clean_fraction: float = typer.Option(0.2, help="Share of the clean training set the "
                                         "attacker holds."),
    epochs: int = typer.Option(20, help="Fine-tuning epochs of each removal attack."),
    lr: float = typer.Option(0.01, help="Learning rate of each removal attack."),
    seeds: int = typer.Option(3, help="Seeds per attack and transfer (0..seeds-1)."),
    alpha: float = typer.Option(ALPHA, help="Ownership is claimed when p < alpha."),
    device: str = DEVICE_OPTION,
    *,
    run: StudyRun,
) -> None:
    """Try to remove the watermark: each removal attack on the attacker's clean data, and
    transfer to a new task; beside an independently trained model (same recipe, another seed)
    as the baseline. Writes the Parquet table and the figure; prints the table.

    Safe to interrupt and re-run into the same --out: finished runs are kept (OUT/results/),
    only missing ones run; `robust-transfer report OUT` re-draws the figure.
    """
    if run.spec is not None and (checkpoint is not None or key is not None):
        raise UserError("give either --spec FILE or CHECKPOINT --key KEY, not both: the spec "
                        "names the checkpoint and the key")

    def build() -> WatermarkRemoval:
        if checkpoint is None or key is None:
            missing = " and ".join(n for n, v in (("CHECKPOINT", checkpoint), ("--key", key))
                                   if v is None)
            raise UserError(f"missing {missing}: give the watermarked checkpoint and its key, "
                            "or --spec FILE")
        if seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {seeds}")
        target = None if transfer_task.strip().lower() == "none" else transfer_task
        return WatermarkRemoval(
            checkpoint, key, attacks=tuple(attack or ATTACKS), clean_fraction=clean_fraction,
            removal_epochs=epochs, removal_lr=lr, target_task=target,
            unfrozen_blocks=tuple(transfer_blocks or (0, 1, "all")),
            images_per_class=transfer_shots, seeds=tuple(range(seeds)), alpha=alpha)

    study = run.study(WatermarkRemoval.name, build)
    if run.saved(study):
        return
    out = require_out(out)
    run_with_progress(study, out, run, device, "runs", "independent model")
    table, figure = watermark_report(out, out)
    summary = watermark_summary(pd.read_parquet(table))
    rows = [{"model": r.model, "test acc": r.test_acc, "Δ test acc": float(r.change),
             "trigger acc": r.trigger_acc, "chance": r.chance, "median p": f"{r.p_median:.3g}",
             "owned": f"{int(r.owned)}/{int(r.n)}"} for r in summary.itertuples()]
    print_table(f"watermark removal (means over {len(study.seeds)} seed(s); Δ: vs the "
                "watermarked source, after transfer vs the independent model's transfer)", rows)
    console.print(f"table: {table}\nfigure: {figure}")
