"""Attack commands (`attack`, `transfer-matrix`): parse, call `attacks` and `report`, print."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.atomic import atomic_write_text
from robust_transfer.attacks import ATTACKS, as_matrix, evaluate, make_threat, transfer_matrix
from robust_transfer.cli import app
from robust_transfer.cli.common import DEVICE_OPTION, console, out, print_table, progress_bar
from robust_transfer.data import load_task
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import load_checkpoint
from robust_transfer.models.runtime import predict_logits, resolve_device
from robust_transfer.report.attack_figures import (
    adversarial_gallery,
    robust_accuracy_curves,
    transfer_heatmap,
)

ATTACK_HELP = "one of: " + ", ".join(sorted(ATTACKS))


def _attack_names(values: list[str]) -> list[str]:
    names = [a.strip().lower() for v in values for a in v.split(",") if a.strip()]
    if not names:
        raise UserError(f"no attack given; {ATTACK_HELP}")
    for name in names:
        check_choice("attack", name, ATTACKS)
    return names


def _check_common(eps: list[float], norm: str, n: int, steps: int | None) -> None:
    if not eps:
        raise UserError("give at least one --eps value")
    for e in eps:
        make_threat(norm, e)  # unknown norm or negative eps -> UserError
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")


@app.command()
def attack(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    attack_names: list[str] = typer.Option(
        ["pgd"], "--attack", help=f"Attack; repeat or comma-separate for a worst-case cascade, "
        f"e.g. apgd-ce,apgd-t,square. {ATTACK_HELP}."),
    norm: str = typer.Option("linf", help="Threat model: linf | l2 | l1."),
    eps: list[float] = typer.Option([0.1], "--eps", help="Radius/radii, e.g. --eps 0.05 0.1 0.2"),
    steps: int = typer.Option(None, help="Iterations (queries for square) per attack; "
                              "default: each attack's published default (pgd: 20)."),
    n: int = typer.Option(200, "--n", help="Number of test images."),
    task: str = typer.Option(None, help="Task to attack on (default: the checkpoint's)."),
    out_dir: Path = typer.Option(None, "--out", help="Directory for figures and the table "
                                 "(default: attack-results/<checkpoint name>)."),
    gallery: int = typer.Option(4, help="Rows in the adversarial gallery."),
    seed: int = typer.Option(0, help="Seed for the attacks' random starts."),
    device: str = DEVICE_OPTION,
) -> None:
    """Robust accuracy vs eps under an attack (cascade); writes curves and a gallery PNG."""
    names = _attack_names(attack_names)
    _check_common(eps, norm, n, steps)
    if gallery < 0:
        raise UserError(f"--gallery must be >= 0, got {gallery}")
    model, meta = load_checkpoint(checkpoint, resolve_device(device))
    task = task or meta.get("task", "digits-0to4")
    test = load_task(task).test
    x, y = test.x[:n], test.y[:n]
    out_dir = out_dir or Path("attack-results") / Path(checkpoint).resolve().name
    examples: dict = {}
    with progress_bar(f"attack {checkpoint} ({', '.join(names)})", len(eps) * len(names)) as adv:
        results = evaluate(model, (x, y), names, eps, norm, steps, seed, progress=adv,
                           examples=examples)
    shown = results[["eps", "attack", "clean_accuracy", "robust_accuracy",
                     "attack_success_rate", "median_min_norm"]]
    shown.columns = ["eps", "attack", "clean acc", "robust acc", "success rate", "median norm"]
    print_table(f"{checkpoint} on {task} ({len(y)} test images, {norm})",
                shown.to_dict("records"))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "robustness.csv", results.to_csv(index=False))
    curves = robust_accuracy_curves(results, out_dir / "robust_accuracy_vs_eps.png",
                                    title=f"{Path(checkpoint).name} on {task}")
    written = [out_dir / "robustness.csv", curves]
    if gallery:
        e = max(eps)
        x_adv = examples[e]
        dev = next(model.parameters()).device
        fooled = (predict_logits(model, x_adv.to(dev)).argmax(1).cpu() != y) & (
            predict_logits(model, x.to(dev)).argmax(1).cpu() == y)
        order = fooled.float().argsort(descending=True, stable=True)[:gallery]
        written.append(adversarial_gallery(
            model, x[order], x_adv[order], out_dir / "gallery.png",
            class_names=[str(c) for c in load_task(task).classes],
            title=f"{', '.join(names)} {norm} eps={e}: clean | perturbation | adversarial"))
    for path in written:
        out.print(f"wrote {path}")


@app.command("transfer-matrix")
def transfer_matrix_command(
    checkpoints: list[Path] = typer.Argument(..., help="Two or more checkpoint directories."),
    attack_name: str = typer.Option("pgd", "--attack", help=f"Attack crafted on each model; "
                                    f"{ATTACK_HELP}."),
    norm: str = typer.Option("linf", help="Threat model: linf | l2 | l1."),
    eps: list[float] = typer.Option([0.1], "--eps", help="Radius/radii."),
    steps: int = typer.Option(None, help="Iterations per attack (default: the attack's)."),
    n: int = typer.Option(200, "--n", help="Number of test images."),
    task: str = typer.Option(None, help="Task (default: the first checkpoint's)."),
    out_dir: Path = typer.Option(Path("attack-results/transfer"), "--out",
                                 help="Directory for the heatmap and the table."),
    seed: int = typer.Option(0, help="Seed for the attacks' random starts."),
    device: str = DEVICE_OPTION,
) -> None:
    """Transferability: examples crafted on each model, accuracy of every model on them."""
    names = _attack_names([attack_name])
    if len(names) != 1:
        raise UserError(f"transfer-matrix takes one attack, got {attack_name!r}; {ATTACK_HELP}")
    name = names[0]
    _check_common(eps, norm, n, steps)
    dev = resolve_device(device)
    models, metas = {}, []
    for ckpt in checkpoints:
        model, meta = load_checkpoint(ckpt, dev)
        label = Path(ckpt).name if Path(ckpt).name not in models else str(ckpt)
        models[label] = model
        metas.append(meta)
    task = task or metas[0].get("task", "digits-0to4")
    test = load_task(task).test
    classes = {m.head.out_features for m in models.values()}
    if classes != {load_task(task).num_classes}:
        raise UserError(f"all checkpoints need {load_task(task).num_classes} classes for task "
                        f"{task!r}; got {sorted(classes)}")
    x, y = test.x[:n], test.y[:n]
    tables = []
    with progress_bar(f"transfer matrix ({name})", len(eps) * len(models)) as advance:
        for e in eps:
            tables.append(transfer_matrix(models, (x, y), name, e, norm, steps, seed,
                                          progress=advance))
    import pandas as pd

    table = pd.concat(tables, ignore_index=True)
    for e, part in table.groupby("eps", sort=False):
        mat = as_matrix(part).reset_index()
        print_table(f"accuracy on adversarial examples: {name} {norm} eps={e} "
                    "(rows: crafted on, columns: evaluated on)",
                    [{str(k): v for k, v in r.items()} for r in mat.to_dict("records")])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "transfer_matrix.csv", table.to_csv(index=False))
    heatmap = transfer_heatmap(table, out_dir / "transfer_matrix.png")
    console.print(f"{len(models)} models, {len(y)} test images of {task}")
    out.print(f"wrote {out_dir / 'transfer_matrix.csv'}")
    out.print(f"wrote {heatmap}")
