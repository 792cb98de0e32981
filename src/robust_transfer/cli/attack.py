"""Attack commands (`attack` = `evaluate`, `transfer-matrix`): parse, call `attacks.evaluate`
and `report`, print. Both commands validate every option before loading or attacking."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.atomic import atomic_write_text
from robust_transfer.attacks import NORMS, as_matrix, evaluate, make_threat, transfer_matrix
from robust_transfer.attacks.registry import check_norm, names_help, stages
from robust_transfer.attacks.threats import DEFAULT_EPS
from robust_transfer.cli import app
from robust_transfer.cli.common import (
    DEVICE_OPTION,
    check_output_dir,
    checkpoint_task,
    console,
    out,
    print_table,
    progress_bar,
    split_values,
)
from robust_transfer.data import load_task
from robust_transfer.errors import UserError
from robust_transfer.models import SourceCard, load_checkpoint, read_card
from robust_transfer.models.runtime import predict_logits, resolve_device
from robust_transfer.report.attack_figures import (
    adversarial_gallery,
    robust_accuracy_curves,
    transfer_heatmap,
)

NORM_HELP = " | ".join(NORMS)


def _attack_names(values: list[str]) -> list[str]:
    names = [a.lower() for a in split_values(values)]
    if not names:
        raise UserError(f"no attack given; {names_help()}")
    return names


def _threat(card: SourceCard, norm: str | None, eps: list[float] | None
            ) -> tuple[str, list[float]]:
    """The threat model to evaluate: the options, else the checkpoint's own training threat
    model (an adversarially trained source), else Linf at DEFAULT_EPS."""
    trained = card.eps is not None and float(card.eps) > 0
    if norm is None:
        norm = card.norm if trained and card.norm in NORMS else "linf"
    if not eps:
        eps = [float(card.eps)] if trained and norm == card.norm \
            else [DEFAULT_EPS.get(norm, 0.1)]
    return norm, eps


def _check(names: list[str], norm: str, eps: list[float], n: int) -> None:
    check_norm(names, norm)  # unknown names, unsupported norms
    for e in eps:
        make_threat(norm, e)  # negative, NaN or infinite eps
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")


def _test_set(task: str, num_classes: int, n: int):
    data = load_task(task)
    if data.num_classes != num_classes:
        raise UserError(f"task {task!r} has {data.num_classes} classes but the model has "
                        f"{num_classes}; pick the task the model was trained on")
    return data, data.test.x[:n], data.test.y[:n]


def attack(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    attack_names: list[str] = typer.Option(
        ["pgd"], "--attack", help="Attack or cascade; repeat or comma-separate for a worst-case "
        f"cascade, e.g. apgd-ce,apgd-t,square or autoattack. {names_help()}."),
    norm: str = typer.Option(None, help=f"Threat model: {NORM_HELP} (default: the checkpoint's "
                             "adversarial-training norm, else linf)."),
    eps: list[float] = typer.Option(None, "--eps", help="Radius/radii in pixel space, e.g. "
                                    "--eps 0.05 0.1 0.2 (default: the checkpoint's training "
                                    "eps, else 0.1 linf / 0.5 l2 / 2.0 l1)."),
    steps: int = typer.Option(None, help="Iterations (queries for square) of every attack; "
                              "default: each attack's published budget (pgd: 20)."),
    n: int = typer.Option(200, "--n", help="Number of test images."),
    task: str = typer.Option(None, help="Task to attack on (default: the checkpoint's)."),
    out_dir: Path = typer.Option(None, "--out", help="Directory for figures and the table "
                                 "(default: attack-results/<checkpoint name>)."),
    gallery: int = typer.Option(4, help="Rows in the adversarial gallery (0: none)."),
    seed: int = typer.Option(0, help="Seed for the attacks' random starts."),
    device: str = DEVICE_OPTION,
) -> None:
    """Clean and robust accuracy vs eps under an attack cascade (worst case per example);
    prints the table, writes robustness.csv, robust_accuracy_vs_eps.png and gallery.png."""
    names = _attack_names(attack_names)
    card = read_card(checkpoint)
    norm, eps = _threat(card, norm, eps)
    _check(names, norm, eps, n)
    if gallery < 0:
        raise UserError(f"--gallery must be >= 0, got {gallery}")
    out_dir = out_dir or Path("attack-results") / Path(checkpoint).resolve().name
    check_output_dir(out_dir)
    task = checkpoint_task(card, task, checkpoint)
    model, _ = load_checkpoint(checkpoint, resolve_device(device))
    data, x, y = _test_set(task, model.spec.num_classes, n)
    examples: dict = {}
    total = len(eps) * len(stages(names, steps))
    with progress_bar(f"attack {checkpoint} ({', '.join(names)})", total) as advance:
        results = evaluate(model, x, y, names, eps, norm, steps, seed, examples=examples,
                           progress=advance)
    shown = results[["eps", "attack", "clean_accuracy", "robust_accuracy", "n_broken",
                     "median_min_norm"]]
    shown.columns = ["eps", "attack", "clean acc", "robust acc", "broken", "median norm"]
    print_table(f"{checkpoint} on {task} ({len(y)} test images, {norm})",
                shown.to_dict("records"))
    atomic_write_text(out_dir / "robustness.csv", results.to_csv(index=False))
    written = [out_dir / "robustness.csv", robust_accuracy_curves(
        results, out_dir / "robust_accuracy_vs_eps.png", title=f"{Path(checkpoint).name} on "
        f"{task}")]
    if gallery:
        e = max(eps)
        x_adv = examples[e]
        fooled = (predict_logits(model, x_adv).argmax(1) != y) & \
            (predict_logits(model, x).argmax(1) == y)
        order = fooled.float().argsort(descending=True, stable=True)[:gallery]
        written.append(adversarial_gallery(
            model, x[order], x_adv[order], out_dir / "gallery.png",
            class_names=[str(c) for c in data.classes],
            title=f"{', '.join(names)} {norm} eps={e}: clean | perturbation | adversarial"))
    for path in written:
        out.print(f"wrote {path}")


app.command("attack")(attack)
app.command("evaluate", help="Same as `attack` (one code path): clean and robust accuracy "
            "of a checkpoint under an attack cascade, with the table, curves and gallery.")(
    attack)


@app.command("transfer-matrix")
def transfer_matrix_command(
    checkpoints: list[Path] = typer.Argument(..., help="Two or more checkpoint directories "
                                             "of models trained on the same task."),
    attack_name: str = typer.Option("pgd", "--attack", help=f"Attack crafted on each model; "
                                    f"{names_help()}."),
    norm: str = typer.Option("linf", help=f"Threat model: {NORM_HELP}."),
    eps: list[float] = typer.Option([0.1], "--eps", help="Radius/radii."),
    steps: int = typer.Option(None, help="Iterations per attack (default: the attack's)."),
    n: int = typer.Option(200, "--n", help="Number of test images."),
    task: str = typer.Option(None, help="Task (default: the checkpoints' own)."),
    out_dir: Path = typer.Option(Path("attack-results/transfer"), "--out",
                                 help="Directory for the heatmap and the table."),
    seed: int = typer.Option(0, help="Seed for the attacks' random starts."),
    device: str = DEVICE_OPTION,
) -> None:
    """Transferability: examples crafted on each model (inside the eps-ball), accuracy of
    every model on them. Rows: crafted on; columns: evaluated on."""
    names = _attack_names([attack_name])
    if len(names) != 1:
        raise UserError(f"transfer-matrix takes one attack, got {attack_name!r}")
    name = names[0]
    _check(names, norm, eps, n)
    if len(checkpoints) < 2:
        raise UserError(f"transfer-matrix needs two or more checkpoints, got {len(checkpoints)}")
    cards = [read_card(c) for c in checkpoints]
    tasks = {str(c): card.task for c, card in zip(checkpoints, cards, strict=True)}
    if len(set(tasks.values())) > 1:
        listed = ", ".join(f"{c}: {t}" for c, t in tasks.items())
        raise UserError(f"the checkpoints were trained on different tasks ({listed}); a "
                        "transfer matrix compares models of one task")
    check_output_dir(out_dir)
    task = checkpoint_task(cards[0], task, checkpoints[0])
    dev = resolve_device(device)
    models = {}
    for ckpt in checkpoints:
        model, _ = load_checkpoint(ckpt, dev)
        label = Path(ckpt).name if Path(ckpt).name not in models else str(ckpt)
        models[label] = model
    for model in models.values():
        _, x, y = _test_set(task, model.spec.num_classes, n)
    with progress_bar(f"transfer matrix ({name})", len(models)) as advance:
        table = transfer_matrix(models, x, y, name, eps, norm, steps, seed, progress=advance)
    for e, part in table.groupby("eps", sort=False):
        mat = as_matrix(part).reset_index()
        print_table(f"accuracy on adversarial examples: {name} {norm} eps={e} "
                    "(rows: crafted on, columns: evaluated on)",
                    [{str(k): v for k, v in r.items()} for r in mat.to_dict("records")])
    atomic_write_text(out_dir / "transfer_matrix.csv", table.to_csv(index=False))
    heatmap = transfer_heatmap(table, out_dir / "transfer_matrix.png")
    console.print(f"{len(models)} models, {len(y)} test images of {task}")
    out.print(f"wrote {out_dir / 'transfer_matrix.csv'}")
    out.print(f"wrote {heatmap}")

