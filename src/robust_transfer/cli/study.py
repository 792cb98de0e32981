"""The robust-transfer study: train, evaluate, finetune, grid, report, demo.

Every command validates its inputs and outputs (names, numbers, `--out`) before any work
starts, so a bad value costs nothing and is one `error:` line.
"""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.atomic import atomic_write_text
from robust_transfer.attacks import NORMS
from robust_transfer.cli import app
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    check_checkpoint_out,
    check_output_dir,
    console,
    print_outputs,
    print_table,
    progress_bar,
    with_options,
)
from robust_transfer.cli.studies import (
    StudyRun,
    run_with_progress,
    study_options,
)
from robust_transfer.data import TASKS
from robust_transfer.errors import UserError
from robust_transfer.models import ARCHS, save_checkpoint
from robust_transfer.models.runtime import resolve_device
from robust_transfer.report.backdoor_transfer import make_backdoor_report
from robust_transfer.report.certify_transfer import make_certify_report
from robust_transfer.report.studies import make_study_report, study_of
from robust_transfer.report.study import headline_rows, make_report
from robust_transfer.studies import GRID
from robust_transfer.train import SourceConfig, TrainConfig, train_source
from robust_transfer.train.methods import ATTACK_MODE, METHODS, OPTION_NAMES, option_declaration
from robust_transfer.train.overfit import ACTIONS
from robust_transfer.transfer import FinetuneConfig
from robust_transfer.transfer.certify_study import certify_sources
from robust_transfer.transfer.grid import (
    GridStudy,
    check_engine,
    demo_spec_path,
    engine_times,
)
from robust_transfer.transfer.results import manifest_run_ids, read_results, writer_lock
from robust_transfer.transfer.run import finetune_from_checkpoint
from robust_transfer.transfer.spec import load_spec

# In backticks: rich's markdown help would take <dir> for an HTML tag and drop it.
TASK_NAMES = ", ".join([*TASKS, "`imagefolder:<dir>[@<size>]`"])
NORM_NAMES = " | ".join(NORMS)
ATTACK_MODE_HELP = ", ".join(f"{m} {mode}" for m, mode in ATTACK_MODE.items())
ARCH_NAMES = " | ".join(f"{name} ({a.input_size}x{a.input_size})" for name, a in ARCHS.items())


def _method_option_flags() -> dict:
    """One flag per training-method option (`train.methods.OPTION_NAMES`: --trades-beta,
    --free-replays, ...), typed, with the help and default its method declares."""
    flags = {}
    for name in OPTION_NAMES:
        owners, field, kind = option_declaration(name)
        help_text = f"{', '.join(owners)}: {field.metadata['help']} (default {field.default})."
        flags[name] = (kind, typer.Option(None, "--" + name.replace("_", "-"), help=help_text))
    return flags


@app.command()
@with_options(_method_option_flags(), "method_options", dict)
def train(
    out: Path = typer.Option(..., "--out", help="Directory for the checkpoint."),
    task: str = typer.Option("digits-0to4", help=f"Source task: {TASK_NAMES}."),
    arch: str = typer.Option("cnn-small", help=f"Architecture: {ARCH_NAMES}."),
    eps: float = typer.Option(0.0, help="Adversarial-training radius (smoothadv: its L2 "
                              "attack's); 0 trains naturally, or with --method gaussian."),
    norm: str = typer.Option("l2", help=f"Threat model of adversarial training: {NORM_NAMES}."),
    attack_steps: int = typer.Option(7, help="PGD steps per training batch."),
    epochs: int = typer.Option(30, help="Training epochs."),
    lr: float = typer.Option(0.1, help="SGD learning rate (step decay /10 every epochs//3)."),
    batch_size: int = typer.Option(64, help="Batch size."),
    seed: int = typer.Option(0, help="Seed for initialisation, shuffling and attacks."),
    method: str = typer.Option(None, "--method", help=f"{' | '.join(METHODS)} (default: "
                               "natural if eps is 0, else pgd)."),
    on_overfit: str = typer.Option(None, "--on-overfit", help=f"{' | '.join(ACTIONS)}: "
                                   "catastrophic-overfitting watch on a held-out batch "
                                   "(default: warn for fast, off otherwise)."),
    attack_mode: str = typer.Option(None, "--attack-mode", help="eval | train: the model's "
                                    "mode while training examples are made (default: the "
                                    "method's reference code: " + ATTACK_MODE_HELP + ")."),
    device: str = DEVICE_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a checkpoint already in --out."),
    *,
    method_options: dict,
) -> None:
    """Train a source model (natural, or adversarially: pgd, fgsm, fast, free, trades; or for
    randomized smoothing: gaussian noise, smoothadv) and save it as a checkpoint; per-epoch
    wall time goes into its metrics.

    Refuses an --out that already holds a checkpoint unless --overwrite is given.
    """
    cfg = SourceConfig(
        task=task, arch=arch, eps=eps, norm=norm, attack_steps=attack_steps,
        train=TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed),
        method=method, on_overfit=on_overfit, attack_mode=attack_mode, **method_options)
    dev = resolve_device(device)
    check_checkpoint_out(out, overwrite)
    label = cfg.method if eps == 0 else f"{cfg.method.upper()}-AT {norm} eps={eps}"
    if cfg.sigma is not None:
        label += f" sigma={cfg.sigma:g}"
    with progress_bar(f"train {task} ({label})", cfg.sweeps) as advance:
        model, card = train_source(cfg, dev, on_epoch=lambda _epoch: advance())
    save_checkpoint(model, out, card)
    m = card.metrics
    row = {"checkpoint": str(out), "task": task, "clean accuracy": m["clean_accuracy"]}
    if eps > 0:
        row[f"PGD-20 {norm} eps={eps:g}"] = m["robust_accuracy"]
    if cfg.sigma is not None:
        row[f"clean under N(0, {cfg.sigma:g}²)"] = m["noise_accuracy"]
    row["s/epoch"] = m["train_seconds"] / m["history"][-1]["passes"]  # free: per pass
    print_table(f"source model ({cfg.method})", [row])
    overfit = m.get("overfit")
    if overfit and overfit["catastrophic_overfit_epochs"]:
        kept = ("rolled back to" if overfit["rolled_back"] else "last good")
        console.print(f"warning: catastrophic overfitting at epoch(s) "
                      f"{overfit['catastrophic_overfit_epochs']}; {kept} epoch "
                      f"{overfit['last_good_epoch']}")


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
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a checkpoint already in --out."),
    augment: bool = typer.Option(False, "--augment", help="Random crop with size/8 padding, "
                                 "plus horizontal flips for natural images (not digits)."),
    noise_sigma: float = typer.Option(0.0, "--noise-sigma", help="Add N(0, S²) Gaussian noise "
                                      "to every training batch (randomized smoothing at "
                                      "noise level S after transfer); 0 = none."),
) -> None:
    """Fine-tune a source checkpoint on a target task (re-initialised head, last k blocks).

    Refuses an --out that already holds a checkpoint unless --overwrite is given.
    """
    cfg = FinetuneConfig(task, images_per_class, unfrozen_blocks, epochs, lr, seed=seed,
                         augment=augment, noise_sigma=noise_sigma)
    dev = resolve_device(device)
    check_checkpoint_out(out, overwrite)
    rows = finetune_from_checkpoint(checkpoint, cfg, out, dev)
    keys = ("epoch", "train_loss", "test_accuracy")
    shown = [r for r in rows if r["epoch"] in (1, len(rows)) or r["epoch"] % 10 == 0]
    print_table(f"fine-tune {checkpoint} -> {task}", [{k: r[k] for k in keys} for r in shown])
    if out is not None:
        console.print(f"fine-tuned model saved to {out}")


def run_grid_with_progress(spec, out: Path, run: StudyRun, device: str,
                           tasks_per_gpu: int = 4, engine: str = "auto",
                           max_memory: float | None = None) -> Path:
    """Run the grid with progress bars (`studies.run_with_progress`); the closing line adds
    the rate per engine: runs / the worker time their units took."""
    if max_memory is not None and not max_memory > 0:
        raise UserError(f"--max-memory must be > 0 GiB, got {max_memory}")
    check_engine(spec, engine)
    per_engine: dict[str, list[float]] = {}

    def engine_time(name: str, runs: int, seconds: float) -> None:
        runs_seconds = per_engine.setdefault(name, [0, 0.0])
        runs_seconds[0] += runs
        runs_seconds[1] += seconds

    def rates() -> str:
        return "".join(f"; {name} {int(n)} at {n / max(t, 1e-9):.1f} per s"
                       for name, (n, t) in sorted(per_engine.items()))

    limit = None if max_memory is None else int(max_memory * 2**30)
    return run_with_progress(GridStudy(spec, engine, limit), out, run, device, "fine-tunes",
                             "source model(s)", tasks_per_gpu, engine_times(engine_time), rates)


@app.command()
@study_options(spec=False, save_spec=False, workers=2)
def grid(
    spec_file: Path = typer.Argument(..., help="YAML spec (see specs/demo.yaml)."),
    out: Path = typer.Option(..., "--out", help="Directory for sources, results and spec."),
    device: str = DEVICE_OPTION,
    tasks_per_gpu: int = typer.Option(4, "--tasks-per-gpu", help="Ray: runs sharing one GPU "
                                      "when the cluster has GPUs."),
    engine: str = typer.Option("auto", "--engine", help="auto (runs of one shape trained "
                               "together where a batched engine covers them, else one by "
                               "one) | batched (an error for a run it cannot cover) | "
                               "per-run (the reference path)."),
    max_memory: float = typer.Option(None, "--max-memory", help="GiB the batched engine may "
                                     "use per worker (default: 4 on CPU, 3/4 of free GPU "
                                     "memory); runs are trained in chunks that fit."),
    *,
    run: StudyRun,
) -> None:
    """Run a study grid: train missing sources, run every fine-tune not yet in the results.

    Safe to interrupt and re-run: finished runs are kept, only missing ones run. With
    --executor ray the runs are Ray tasks (same code, same numbers); this process still writes
    every result.

    Re-run with a changed spec into the same --out: runs the two specs share are reused and
    the old spec's other runs stay under OUT/results/, but OUT/spec.yaml, results.parquet,
    the printed run count and `report` then cover the new spec's runs only.
    """
    spec = load_spec(spec_file)
    run_grid_with_progress(spec, out, run, device, tasks_per_gpu, engine, max_memory)


def _certify_report(results: Path, grid_dir: Path, out: Path) -> list[Path]:
    """Figure C1 and certify_summary.md when the table is a certify-transfer study's (its
    runs carry certificates): the sources' certificates come from their cache beside each
    source model (certified here, on the CPU, if a cache is missing)."""
    table = read_results(results)
    if "certify_sigma" not in table or not table["certify_sigma"].notna().any():
        return []
    spec_file = grid_dir / "spec.yaml"
    if not spec_file.is_file():
        console.print(f"note: no {spec_file}: the certification report needs the study's "
                      "folder (its spec and source models)", soft_wrap=True)
        return []
    spec = load_spec(spec_file)
    sources = certify_sources(spec, grid_dir)
    atomic_write_text(Path(out) / "source_certify.csv", sources.to_csv(index=False))
    return make_certify_report(table, sources, out)


@app.command()
def report(
    results: Path = typer.Argument(..., help="A study's --out directory (a grid's, or any "
                                   "study's: its spec.yaml names it), or a results.parquet."),
    out: Path = typer.Option(None, "--out", help="Directory for figures (default: next to "
                             "the results, in report/)."),
    epoch_shots: list[str] = typer.Option(None, "--epoch-shots", help="Images per class for "
                                          "the accuracy-vs-epochs figure (repeatable)."),
) -> None:
    """Figures 1-2 (accuracy vs images and vs epochs, delta vs the natural source) and summary.md.

    A table with backdoored sources also gets Figures B1-B2 (task-agnostic ASR vs images per
    class and vs unfrozen blocks) and backdoor_summary.md; a certify-transfer study's folder
    also gets Figure C1 (certified accuracy vs L2 radius) and certify_summary.md.

    A grid directory reports the finished runs of the spec it was last run with. Robust and
    natural runs are paired per source recipe (task, arch, training), fine-tune and seed; a
    table with several recipes or fine-tuning setups gets one figure set per setup.
    """
    out = out or (results if results.is_dir() else results.parent) / "report"
    check_output_dir(out, "--out")
    if study_of(results) != GRID:
        print_outputs(make_study_report(results, out))
        return
    rep = make_report(results, out, epoch_shots or None)
    grid_dir = results if results.is_dir() else results.parent
    print_outputs([*rep.figures, *make_backdoor_report(results, out),
                   *_certify_report(results, grid_dir, out)])
    console.print(f"summary: {rep.summary}")
    planned = manifest_run_ids(grid_dir)
    if planned and rep.runs < len(planned):
        console.print(f"note: {rep.runs} of {len(planned)} runs of the spec are finished; "
                      "re-run the grid to finish the rest")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Output directory."),
    workers: int = typer.Option(2, "--workers", help="Parallel worker processes."),
    device: str = DEVICE_OPTION,
) -> None:
    """The whole study on the embedded digits data: shipped spec, grid, report.

    Safe to interrupt and re-run: finished runs are kept, only missing ones run.
    """
    spec_path = demo_spec_path()
    spec = load_spec(spec_path)
    check_output_dir(out, "--out")
    console.print(f"spec: {spec_path}")
    with writer_lock(out):  # the report too: one demo writes a directory at a time
        table = run_grid_with_progress(spec, out, StudyRun(workers=workers), device)
        rep = make_report(table, out / "report")
    for f in rep.figures:
        console.print(f"figure: {f}")
    console.print(f"summary: {rep.summary}")
    print_table("final test accuracy (mean over seeds; CIs in summary.md)", headline_rows(table))
