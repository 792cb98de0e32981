"""Watermark commands (Adi et al. 2018, watermarking by backdooring): `watermark embed` (train a
source with a secret trigger set; the key is written apart from the checkpoint), `watermark
verify` (trigger-set accuracy, chance, p-value, OWNED / NOT OWNED) and `watermark remove` (the
removal study: FTLL / FTAL / RTLL / RTAL and transfer; Parquet table, figure, printed table).
Thin: parse, validate, call `backdoors.watermark` / `transfer.watermark_transfer`, print."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.backdoors.watermark import (
    ALPHA,
    ATTACKS,
    KEY_META,
    KEY_WEIGHTS,
    RemovalConfig,
    check_key_images,
    check_model_fits,
    independent_recipe,
    load_key,
    make_key,
    save_key,
    train_watermarked,
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
from robust_transfer.data import TASKS, load_task
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import load_checkpoint, save_checkpoint
from robust_transfer.models.runtime import resolve_device
from robust_transfer.report.common import save_table
from robust_transfer.report.watermark_figures import watermark_bars, watermark_summary
from robust_transfer.train import SourceConfig, TrainConfig, train_source
from robust_transfer.transfer.watermark_transfer import (
    PERMUTATIONS,
    StudyConfig,
    transfer_verify,
    watermark_study,
)

watermark_app = typer.Typer(help="Watermarking by backdooring (Adi et al. 2018): embed a secret "
                            "trigger set, verify ownership, try to remove it.",
                            no_args_is_help=True)
app.add_typer(watermark_app, name="watermark")

TESTS = ("auto", "binomial", "permutation")
TABLE, FIGURE = "watermark_study.parquet", "watermark_study.png"
KEY_OPTION = typer.Option(..., "--key", help="The watermark key directory (key.safetensors + "
                          "key.json), kept apart from any checkpoint.")


def check_key_apart(key: Path, checkpoint: Path) -> None:
    """The key must live apart from the checkpoint: not the same directory, not inside it
    (nor the checkpoint inside the key), or whoever gets the model gets the secret too."""
    k, c = Path(key).resolve(), Path(checkpoint).resolve()
    if k == c or k.is_relative_to(c) or c.is_relative_to(k):
        raise UserError(f"--key {str(key)!r} must not be inside the checkpoint directory "
                        f"{str(checkpoint)!r} (nor hold it): whoever gets the model would get "
                        "the key; give a separate directory")


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
        model, meta = train_watermarked(cfg, wm_key, repeats, dev, lambda _e: advance())
    save_key(wm_key, key, {"task": task})
    save_checkpoint(model, out, meta)
    m = meta["metrics"]
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
    model, meta = load_checkpoint(checkpoint, resolve_device(device))
    check_key_images(model, wm_key)
    same_task = (model.spec.num_classes == wm_key.num_classes
                 and meta.get("task", key_meta.get("task")) == key_meta.get("task"))
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
def remove_command(
    checkpoint: Path = typer.Argument(..., help="A watermarked checkpoint (watermark embed)."),
    key: Path = KEY_OPTION,
    out: Path = typer.Option(..., "--out", help=f"Directory for {TABLE} and {FIGURE}."),
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
) -> None:
    """Try to remove the watermark: each removal attack on the attacker's clean data, and
    transfer to a new task; beside an independently trained model (same recipe, another seed)
    as the baseline. Writes the Parquet table and the figure; prints the table."""
    check_key_apart(key, checkpoint)
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    target = None if transfer_task.strip().lower() == "none" else transfer_task
    cfg = StudyConfig(attacks=tuple(dict.fromkeys(attack or ATTACKS)),
                      removal=RemovalConfig(clean_fraction=clean_fraction, epochs=epochs, lr=lr),
                      transfer_task=target, transfer_blocks=tuple(transfer_blocks or (0, 1, None)),
                      transfer_shots=transfer_shots, seeds=tuple(range(seeds)), alpha=alpha)
    check_output_dir(out, "--out")
    dev = resolve_device(device)
    wm_key, _ = load_key(key)
    model, meta = load_checkpoint(checkpoint, dev)
    check_model_fits(model, wm_key)
    recipe = independent_recipe(meta)
    with progress_bar(f"removal study of {checkpoint}", recipe.train.epochs + cfg.steps()) as adv:
        independent, _ = train_source(recipe, dev, on_epoch=lambda _e: adv())
        table = watermark_study(model, independent, wm_key, meta["task"], cfg,
                                on_step=lambda _s: adv())
    save_table(table, out / TABLE)
    figure = watermark_bars(table, out / FIGURE)
    rows = [{"model": r.model, "test acc": r.test_acc, "Δ test acc": float(r.change),
             "trigger acc": r.trigger_acc, "chance": r.chance, "median p": f"{r.p_median:.3g}",
             "owned": f"{int(r.owned)}/{int(r.n)}"}
            for r in watermark_summary(table).itertuples()]
    print_table(f"watermark removal (means over {seeds} seed(s); Δ: vs the watermarked source, "
                "after transfer vs the independent model's transfer)", rows)
    console.print(f"table: {out / TABLE}\nfigure: {figure}")
