"""Checkpoints: a directory with `weights.safetensors` and `meta.json`.

The JSON sidecar (`models.card.SourceCard`) carries everything needed to rebuild the model
(arch, classes, normaliser) plus the training recipe, metrics, seed, package version and the
weights' content hash. safetensors holds only tensors, so loading never unpickles code — a
pretrained model is an attack surface, which is part of this project's subject.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robust_transfer import __version__
from robust_transfer.atomic import atomic_path
from robust_transfer.errors import UserError
from robust_transfer.models.card import (
    META,
    THREAT_NORMS,
    WEIGHTS,
    SourceCard,
    read_card,
    write_card,
)
from robust_transfer.models.nets import BlockNet, build_model

__all__ = ["META", "THREAT_NORMS", "WEIGHTS", "file_sha256", "load_checkpoint",
           "save_checkpoint"]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex): the content hash every sidecar records."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_checkpoint(model: BlockNet, directory: str | Path,
                    card: SourceCard | None = None) -> Path:
    """Save `model` to `directory` (created) with `card` as its sidecar; the model's spec,
    the package version and the weights' hash are filled in."""
    if card is not None and not isinstance(card, SourceCard):
        raise TypeError(f"save_checkpoint takes a SourceCard, got {type(card).__name__} "
                        "(models.card.card_from_meta turns a metadata dict into one)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, tmp)
    write_card(directory, dataclasses.replace(
        card or SourceCard(), model=model.spec, package_version=__version__,
        sha256=file_sha256(directory / WEIGHTS)))
    return directory


def checkpoint_sha256(directory: str | Path) -> str:
    """The content hash of a checkpoint's weights, checked against its sidecar's "sha256" (a
    mismatch is a `UserError`: corrupt weights). A study puts it into the run ids of the runs
    that read the checkpoint, so that another checkpoint at the same path never reuses them."""
    recorded = read_card(directory).sha256
    sha = file_sha256(Path(directory) / WEIGHTS)
    if recorded is not None and recorded != sha:
        raise UserError(f"checkpoint {str(directory)!r} is corrupt: its weights do not match "
                        "the sha256 its meta.json records")
    return sha


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[BlockNet, SourceCard]:
    """Rebuild the model from its card alone, load its weights, return (model, card).

    The model comes back in eval mode. A hash mismatch or unreadable weights is a `UserError`.
    """
    directory = Path(directory)
    card = read_card(directory)
    if card.sha256 is not None and file_sha256(directory / WEIGHTS) != card.sha256:
        raise UserError(f"checkpoint {str(directory)!r} is corrupt: weights do not match sha256")
    model = build_model(card.model)
    try:
        model.load_state_dict(load_file(directory / WEIGHTS))
    except (SafetensorError, RuntimeError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"corrupt checkpoint weights in {str(directory)!r}: {first}") from None
    return model.to(device).eval(), card
