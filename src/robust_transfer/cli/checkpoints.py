"""`import`: convert a checkpoint trained elsewhere into a source checkpoint (thin wrapper
over `models.foreign.import_checkpoint`; validation happens before the file is read)."""

from __future__ import annotations

from pathlib import Path

import typer

from robust_transfer.attacks import NORMS, make_threat
from robust_transfer.cli import app
from robust_transfer.cli.common import check_checkpoint_out, console, print_table
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models import ARCHS, read_card
from robust_transfer.models.foreign import FORMATS, import_checkpoint


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise UserError(f"{option} must be numbers separated by commas, got {text!r}") from None
    if not values or (option == "--std" and any(not v > 0 for v in values)):
        raise UserError(f"{option} must be {'positive ' if option == '--std' else ''}numbers "
                        f"separated by commas, got {text!r}")
    return values


@app.command("import")
def import_command(
    file: Path = typer.Argument(..., help="Checkpoint file (.pt/.pth/.ckpt or .safetensors)."),
    format: str = typer.Option(..., "--format", help=" | ".join(FORMATS)),
    arch: str = typer.Option(..., "--arch", help=" | ".join(ARCHS)),
    out: Path = typer.Option(..., "--out", help="Directory for the converted checkpoint."),
    num_classes: int = typer.Option(None, help="Check the file's head has this many classes."),
    eps: float = typer.Option(None, help="The source's adversarial-training radius, if known."),
    norm: str = typer.Option(None, help=f"Its threat model: {' | '.join(NORMS)}."),
    mean: str = typer.Option(None, help="Normaliser mean per channel, e.g. 0.485,0.456,0.406."),
    std: str = typer.Option(None, help="Normaliser std per channel, e.g. 0.229,0.224,0.225."),
    input_size: int = typer.Option(None, help="Image size the source expects (targets are "
                                   "resized to it when fine-tuning); default: no resize."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a checkpoint already in --out."),
) -> None:
    """Convert a MadryLab robustness, torchvision or plain state-dict checkpoint into a
    source checkpoint (safetensors + JSON) that finetune, grid and explain accept.

    Reads only tensors (torch.load weights_only=True, or safetensors): a file whose loading
    would run code is refused without running it.
    """
    check_choice("format", format, FORMATS)
    check_choice("arch", arch, ARCHS)
    if (eps is None) != (norm is None):
        raise UserError("give --eps and --norm together (the source's training threat model)")
    if eps is not None:
        make_threat(norm, eps)  # validates the norm and eps
    means, stds = _floats(mean, "--mean"), _floats(std, "--std")
    check_checkpoint_out(out, overwrite)
    directory = import_checkpoint(file, format, arch, out, num_classes, eps, norm, means, stds,
                                  input_size)
    spec = read_card(directory).model
    row = {"checkpoint": str(directory), "arch": spec.arch,
           "classes": spec.num_classes, "channels": spec.in_channels,
           "threat model": "unknown (counts as natural)" if eps is None else f"{norm} eps={eps:g}"}
    print_table("imported source", [row])
    if eps is None:
        console.print("note: without --eps/--norm the source is recorded as natural (eps 0)")
