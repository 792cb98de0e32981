"""The robust-transfer study: train, evaluate, finetune, grid, report, demo."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.cli import app
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    console,
    print_table,
    progress_bar,
    progress_bars,
)
from robust_transfer.data import TASKS
from robust_transfer.models import load_checkpoint, save_checkpoint
from robust_transfer.models.runtime import resolve_device
from robust_transfer.report.study import headline_rows, make_report
from robust_transfer.train import SourceConfig, TrainConfig, train_source
from robust_transfer.train.source import evaluate_source
from robust_transfer.transfer import FinetuneConfig
from robust_transfer.transfer.grid import demo_spec_path, plan, run_grid
from robust_transfer.transfer.run import finetune_from_checkpoint
from robust_transfer.transfer.spec import expand, load_spec

TASK_NAMES = ", ".join(TASKS)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Directory for the checkpoint."),
    task: str = typer.Option("digits-0to4", help=f"Source task: {TASK_NAMES}."),
    arch: str = typer.Option("cnn-small", help="cnn-small (8x8) | cnn-medium (32x32)."),
    eps: float = typer.Option(0.0, help="PGD-AT radius; 0 trains naturally."),
    norm: str = typer.Option("l2", help="Threat model of adversarial training: l2 | linf."),
    attack_steps: int = typer.Option(7, help="PGD steps per training batch."),
    epochs: int = typer.Option(30, help="Training epochs."),
    lr: float = typer.Option(0.1, help="SGD learning rate (step decay /10 every epochs//3)."),
    batch_size: int = typer.Option(64, help="Batch size."),
    seed: int = typer.Option(0, help="Seed for initialisation, shuffling and attacks."),
    device: str = DEVICE_OPTION,
) -> None:
    """Train a source model (natural or PGD adversarial) and save it as a checkpoint."""
    cfg = SourceConfig(
        task=task, arch=arch, eps=eps, norm=norm, attack_steps=attack_steps,
        train=TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed),
    )
    dev = resolve_device(device)
    label = "natural" if eps == 0 else f"PGD-AT {norm} eps={eps}"
    with progress_bar(f"train {task} ({label})", epochs) as advance:
        model, meta = train_source(cfg, dev, on_epoch=lambda _epoch: advance())
    save_checkpoint(model, out, meta)
    m = meta["metrics"]
    row = {"checkpoint": str(out), "task": task, "clean accuracy": m["clean_accuracy"]}
    if eps > 0:
        row[f"PGD-20 {norm} eps={eps:g}"] = m["robust_accuracy"]
    print_table("source model", [row])


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    eps: list[float] = typer.Option([0.0], "--eps", help="Radius/radii to attack at."),
    norm: str = typer.Option("l2", help="l2 | linf."),
    task: str = typer.Option(None, help="Task to evaluate on (default: the checkpoint's)."),
    device: str = DEVICE_OPTION,
) -> None:
    """Clean and PGD-20 robust test accuracy of a checkpoint."""
    model, meta = load_checkpoint(checkpoint, resolve_device(device))
    task = task or meta.get("task", "digits-0to4")
    rows = []
    for e in eps:
        m = evaluate_source(model, task, e, norm)
        rows.append({"task": task, "norm": norm, "eps": e, "clean accuracy": m["clean_accuracy"],
                     "robust accuracy (PGD-20)": m["robust_accuracy"]})
    print_table(str(checkpoint), rows)


@app.command()
def finetune(
    checkpoint: Path = typer.Argument(..., help="Source checkpoint directory."),
    task: str = typer.Option("digits-5to9", "--task", help=f"Target task: {TASK_NAMES}."),
    images_per_class: str = typer.Option("5", help="Training images per class, or 'all'."),
    unfrozen_blocks: str = typer.Option("0", help="Last blocks to fine-tune (0 = head only), "
                                        "or 'all'."),
    epochs: int = typer.Option(30, help="Fine-tuning epochs."),
    lr: float = typer.Option(0.1, help="SGD learning rate."),
    seed: int = typer.Option(0, help="Seed: picks the k-shot subset and the new head."),
    out: Path = typer.Option(None, "--out", help="Save the fine-tuned model here."),
    device: str = DEVICE_OPTION,
) -> None:
    """Fine-tune a source checkpoint on a target task (re-initialised head, last k blocks)."""
    cfg = FinetuneConfig(task, images_per_class, unfrozen_blocks, epochs, lr, seed=seed)
    rows = finetune_from_checkpoint(checkpoint, cfg, out, resolve_device(device))
    keys = ("epoch", "train_loss", "test_accuracy")
    shown = [r for r in rows if r["epoch"] in (1, len(rows)) or r["epoch"] % 10 == 0]
    print_table(f"fine-tune {checkpoint} -> {task}", [{k: r[k] for k in keys} for r in shown])
    if out is not None:
        console.print(f"fine-tuned model saved to {out}")


def _run_grid_with_progress(spec, out: Path, workers: int) -> Path:
    todo = plan(spec, out)
    total, done = len(todo.runs), len(todo.runs) - len(todo.pending)
    if todo.sources_to_train:
        names = ", ".join(j.directory.name for j in todo.sources_to_train)
        console.print(f"training {len(todo.sources_to_train)} source model(s): {names}")
    if done:
        console.print(f"{done} of {total} fine-tunes already done; running the rest")
    bars = {"source models": len(todo.sources_to_train), "fine-tunes": total}
    with progress_bars(bars) as advance:
        advance["fine-tunes"](done)
        return run_grid(spec, out, workers,
                        on_source_done=lambda _d: advance["source models"](),
                        on_run_done=lambda _r: advance["fine-tunes"]())


@app.command()
def grid(
    spec_file: Path = typer.Argument(..., help="YAML spec (see specs/demo.yaml)."),
    out: Path = typer.Option(..., "--out", help="Directory for sources, results and spec."),
    workers: int = typer.Option(2, "--workers", help="Parallel worker processes."),
) -> None:
    """Run a study grid: train missing sources, run every fine-tune not yet in the results.

    Safe to interrupt and re-run: finished runs are kept, only missing ones run.
    """
    spec = load_spec(spec_file)
    table = _run_grid_with_progress(spec, out, workers)
    console.print(f"results: {table}  ({len(expand(spec))} runs)")


@app.command()
def report(
    results: Path = typer.Argument(..., help="results.parquet, or a grid's --out directory."),
    out: Path = typer.Option(None, "--out", help="Directory for figures (default: next to "
                             "the results, in report/)."),
    epoch_shots: list[str] = typer.Option(None, "--epoch-shots", help="Images per class for "
                                          "the accuracy-vs-epochs figure (repeatable)."),
) -> None:
    """Figures 1-2 (accuracy vs images and vs epochs, delta robust - natural) and summary.md."""
    out = out or (results if results.is_dir() else results.parent) / "report"
    rep = make_report(results, out, epoch_shots or None)
    for f in rep.figures:
        console.print(f"figure: {f}")
    console.print(f"summary: {rep.summary}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Output directory."),
    workers: int = typer.Option(2, "--workers", help="Parallel worker processes."),
) -> None:
    """The whole study on the embedded digits data: shipped spec, grid, report."""
    spec_path = demo_spec_path()
    console.print(f"spec: {spec_path}")
    table = _run_grid_with_progress(load_spec(spec_path), out, workers)
    rep = make_report(table, out / "report")
    for f in rep.figures:
        console.print(f"figure: {f}")
    console.print(f"summary: {rep.summary}")
    print_table("final test accuracy (mean over seeds; CIs in summary.md)", headline_rows(table))
