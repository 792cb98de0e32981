"""Backdoor commands: `backdoor attack` (train a poisoned source), `backdoor evaluate`
(C-Acc / ASR / RA and a gallery), and the top-level `backdoor-defend` (FT, super-FT,
fine-pruning, ABL, ANP, with C-Acc / ASR bars). Thin: parse, validate, call `backdoors`, print."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
import typer

from robust_transfer.atomic import atomic_path, atomic_write_text
from robust_transfer.backdoors.anp import ANPConfig
from robust_transfer.backdoors.defenses import DEFENSES, DefenseConfig, defense_table
from robust_transfer.backdoors.source import (
    gallery_examples,
    recorded_backdoor,
    strongest_trigger,
    train_backdoor_source,
)
from robust_transfer.cli import app
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    check_checkpoint_out,
    check_output_dir,
    console,
    plugin_options_flag,
    print_table,
    progress_bar,
)
from robust_transfer.data import TASKS, load_task
from robust_transfer.data.poison import BACKDOOR_ATTACKS, LABELS, BackdoorConfig
from robust_transfer.data.triggers import TRIGGERS
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import SourceCard, load_checkpoint, save_checkpoint
from robust_transfer.models.runtime import predict_logits, resolve_device
from robust_transfer.plugins import parse_assignments
from robust_transfer.report.backdoor_figures import defense_bars, trigger_gallery
from robust_transfer.train import SourceConfig, TrainConfig

backdoor_app = typer.Typer(help="Backdoored source models: plant (attack), measure (evaluate), "
                           "follow through transfer (transfer) and model updates (updates).",
                           no_args_is_help=True)
app.add_typer(backdoor_app, name="backdoor")

TASK_NAMES = ", ".join(TASKS)


def _metric_row(name: str, m: dict) -> dict:
    return {"model": name, "C-Acc": m["clean_accuracy"], "ASR": m["asr"], "RA": m["ra"],
            "target": "–" if m["asr_label"] is None else m["asr_label"],
            "triggered images": m["n_triggered"]}


@backdoor_app.command("attack")
def attack(
    out: Path = typer.Option(..., "--out", help="Directory for the poisoned checkpoint."),
    task: str = typer.Option("digits-0to4", help=f"Source task: {TASK_NAMES}."),
    trigger: str = typer.Option("badnets", help=f"Backdoor attack: {' | '.join(BACKDOOR_ATTACKS)}"
                                " (a trigger's name: poisoning with it; neuba: planted by the "
                                "pre-training loss, task-agnostic, rate = share of each batch)."),
    rate: float = typer.Option(0.1, help="Poison rate in (0, 1] (clean-label: of the target "
                               "class's images)."),
    target: int = typer.Option(0, help="Target class (all-to-one)."),
    labels: str = typer.Option("all-to-one", help=f"{' | '.join(LABELS)}."),
    clean_label: bool = typer.Option(False, "--clean-label",
                                     help="Poison only target-class images; keep labels."),
    patch_size: int = typer.Option(None, help="BadNets patch side (default: scaled to the "
                                   "image, 2 on 8x8, 3 on 32x32)."),
    wanet_k: int = typer.Option(None, help="WaNet control grid side k (default 4)."),
    wanet_s: float = typer.Option(None, help="WaNet warping strength s (default 0.5)."),
    cross_ratio: float = typer.Option(None, help="WaNet noise mode: noise-warped images with "
                                      "true labels per poisoned image (default 2; 0: off)."),
    trigger_option: list[str] = plugin_options_flag("--trigger-option", "the trigger (or "
                                                    "neuba)", TRIGGERS, BACKDOOR_ATTACKS),
    arch: str = typer.Option("cnn-small", help="cnn-small (8x8) | cnn-medium (32x32)."),
    eps: float = typer.Option(0.0, help="PGD-AT radius; 0 trains naturally."),
    norm: str = typer.Option("l2", help="Threat model of adversarial training."),
    epochs: int = typer.Option(30, help="Training epochs."),
    lr: float = typer.Option(0.1, help="SGD learning rate."),
    seed: int = typer.Option(0, help="Seed for initialisation, shuffling and the poisoned "
                             "images."),
    device: str = DEVICE_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a checkpoint already in --out."),
) -> None:
    """Train a source model with a backdoor planted (a poisoned training set, or NeuBA's loss)
    and save it; print C-Acc / ASR / RA."""
    options = trigger_options(trigger_option, {"k": wanet_k, "s": wanet_s,
                                               "cross_ratio": cross_ratio})
    backdoor = BackdoorConfig(trigger, rate, target, labels, clean_label, seed, patch_size,
                              trigger_options=options)
    cfg = SourceConfig(task=task, arch=arch, eps=eps, norm=norm, backdoor=backdoor,
                       train=TrainConfig(epochs=epochs, lr=lr, seed=seed))
    backdoor.attack_plugin().triggers(load_task(task).input_shape)  # a patch too large: now
    dev = resolve_device(device)
    check_checkpoint_out(out, overwrite)
    with progress_bar(f"train {task} poisoned ({trigger}, rate {rate:g})", epochs) as advance:
        model, card = train_backdoor_source(cfg, dev, on_epoch=lambda _epoch: advance())
    save_checkpoint(model, out, card)
    m = card.metrics
    console.print(f"{m['poisoned_count']} poisoned training images; checkpoint: {out}")
    print_table("poisoned source", [_metric_row(str(out), {**m, "clean_accuracy":
                                                           m["clean_accuracy"]})])


def trigger_options(assignments: list[str] | None, flags: dict) -> dict:
    """`--trigger-option KEY=VALUE`s merged with the specific flags that were given (e.g.
    `--wanet-k`: {"k": ...}); one key given both ways is a `UserError`."""
    options = parse_assignments(assignments or [], "--trigger-option")
    for key, value in flags.items():
        if value is not None:
            if key in options:
                raise UserError(f"trigger option {key} given twice (a flag and "
                                "--trigger-option)")
            options[key] = value
    return options


@backdoor_app.command("evaluate")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A backdoored checkpoint (backdoor attack)."),
    out: Path = typer.Option(None, "--out", help="Directory for metrics.json and the gallery "
                             "(default: print only)."),
    images: int = typer.Option(8, help="Images in the gallery."),
    device: str = DEVICE_OPTION,
) -> None:
    """C-Acc / ASR / RA of a backdoored checkpoint on its task's test set, and a gallery of
    triggered test images with the model's predictions."""
    if images < 1:
        raise typer.BadParameter(f"--images must be >= 1, got {images}")
    if out is not None:
        check_output_dir(out, "--out")
    dev = resolve_device(device)
    model, card = load_checkpoint(checkpoint, dev)
    backdoor = recorded_backdoor(card)
    trig, m = strongest_trigger(model, card, backdoor)
    print_table(f"backdoor {backdoor.attack} (target {backdoor.target})",
                [_metric_row(str(checkpoint), m)])
    if out is None:
        return
    task = load_task(card.task)
    # the label the trigger sends images to (task-agnostic NeuBA: the most common one)
    target = m["asr_label"] if backdoor.attack_plugin().task_agnostic else (
        backdoor.target if backdoor.labels == "all-to-one" else None)
    index = gallery_examples(task.test.y, target, images)
    x, y = task.test.x[index], task.test.y[index]
    xt = trig.apply(x)
    pred, pred_t = (predict_logits(model, v).argmax(1) for v in (x, xt))
    gallery = trigger_gallery(out / "gallery.png", x, xt, y, pred, pred_t, target,
                              title=f"{backdoor.attack}: C-Acc {m['clean_accuracy']:.3f}, "
                              f"ASR {m['asr']:.3f}, RA {m['ra']:.3f}")
    atomic_write_text(out / "metrics.json", json.dumps(m, indent=2))
    console.print(f"figure: {gallery}")


@app.command("backdoor-defend")
def backdoor_defend(
    checkpoint: Path = typer.Argument(..., help="A backdoored checkpoint (backdoor attack)."),
    out: Path = typer.Option(..., "--out", help="Directory for defenses.csv, the bar figure "
                             "and one defended checkpoint per defense."),
    defense: list[str] = typer.Option(None, "--defense", help=f"{' | '.join(DEFENSES)} "
                                      "(repeatable; default: all)."),
    clean_fraction: float = typer.Option(0.1, help="Share of the clean training set the "
                                         "defender has (FT, super-FT, fine-pruning, ANP)."),
    epochs: int = typer.Option(10, help="Fine-tuning epochs (super-FT: per phase)."),
    lr: float = typer.Option(0.01, help="Fine-tuning learning rate (FT, fine-pruning)."),
    prune_drop: float = typer.Option(0.05, help="Fine-pruning stops when clean accuracy "
                                     "drops by more than this."),
    prune_step: int = typer.Option(1, help="Fine-pruning: channels pruned per step (1: one "
                                   "at a time, as Liu et al.)."),
    anp_threshold: float = typer.Option(0.2, help="ANP prunes neurons whose mask ends at or "
                                        "below this."),
    anp_iterations: int = typer.Option(2000, help="ANP mask optimisation iterations."),
    anp_batch_size: int = typer.Option(128, help="ANP batch size (drawn with replacement)."),
    defense_option: list[str] = plugin_options_flag("--defense-option", "a chosen defense "
                                                    "(set in every chosen defense that has "
                                                    "it; overrides the flags above)",
                                                    DEFENSES),
    seed: int = typer.Option(0, help="Seed for the clean subset and the defenses."),
    device: str = DEVICE_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace defended checkpoints already in --out."),
) -> None:
    """Remove a backdoor with FT, super-fine-tuning, fine-pruning, ABL or ANP; report C-Acc / ASR /
    RA before and after, the clean data used, and the sequela (PGD-20 robust accuracy, ASR of
    a fresh backdoor), as a table, defenses.csv and C-Acc / ASR bars."""
    defenses = list(dict.fromkeys(defense or DEFENSES))
    for name in defenses:
        check_choice("defense", name, DEFENSES)
    cfg = DefenseConfig(clean_fraction=clean_fraction, epochs=epochs, lr=lr,
                        prune_drop=prune_drop, prune_step=prune_step, seed=seed,
                        anp=ANPConfig(iterations=anp_iterations, batch_size=anp_batch_size,
                                      threshold=anp_threshold))
    cfg = cfg.with_options(parse_assignments(defense_option or [], "--defense-option"),
                           defenses)
    check_output_dir(out, "--out")
    for name in defenses:
        check_checkpoint_out(out / name, overwrite, f"--out/{name}")
    dev = resolve_device(device)
    model, card = load_checkpoint(checkpoint, dev)
    backdoor = recorded_backdoor(card)
    if backdoor.attack not in TRIGGERS:
        raise UserError(f"backdoor-defend needs a data-poisoning backdoor ({', '.join(TRIGGERS)})"
                        f", the checkpoint has {backdoor.attack!r}")
    task = load_task(card.task)
    source_train = TrainConfig(**card.train_recipe) if card.train_recipe else None
    index = card.backdoor.get("poisoned_indices")
    with progress_bar(f"defenses on {checkpoint}", len(defenses)) as advance:
        rows, models = defense_table(
            model, defenses, task, backdoor, cfg, source_train,
            None if index is None else torch.tensor(index, dtype=torch.long),
            on_defense=lambda _d: advance())
    table = pd.DataFrame(rows)
    for name, defended in models.items():
        save_checkpoint(defended, out / name, SourceCard(
            role="defended", task=card.task, defense=name, defense_config=asdict(cfg),
            source_checkpoint=str(checkpoint), backdoor=card.backdoor, recipe=card.recipe,
            metrics={k.removesuffix("_after"): v for k, v in
                     table[table.defense == name].iloc[0].items() if k.endswith("_after")}))
    with atomic_path(out / "defenses.csv") as tmp:
        table.to_csv(tmp, index=False)
    figure = defense_bars(table, out / "defenses.png",
                          title=f"{backdoor.attack} on {card.task}: defenses")
    shown = {"defense": "defense", "clean_data_fraction": "clean data",
             "clean_accuracy_before": "C-Acc", "clean_accuracy_after": "C-Acc after",
             "asr_before": "ASR", "asr_after": "ASR after", "ra_after": "RA after",
             "robust_accuracy_before": "PGD acc", "robust_accuracy_after": "PGD acc after",
             "fresh_asr_before": "fresh ASR", "fresh_asr_after": "fresh ASR after"}
    print_table("backdoor defenses (sequela: PGD-20 accuracy, ASR of a fresh backdoor)",
                table[list(shown)].rename(columns=shown).to_dict("records"))
    console.print(f"table: {out / 'defenses.csv'}\nfigure: {figure}")
