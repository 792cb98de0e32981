"""Checkpoints: a directory with `weights.safetensors` and `meta.json`.

The JSON sidecar carries everything needed to rebuild the model (arch, classes, normaliser)
plus the training recipe, metrics, seed, package version and the weights' content hash.
safetensors holds only tensors, so loading never unpickles code — a pretrained model is an
attack surface, which is part of this project's subject.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robust_transfer import __version__
from robust_transfer.atomic import atomic_path, atomic_write_text
from robust_transfer.errors import UserError
from robust_transfer.models.nets import BlockNet, ModelSpec, build_model

WEIGHTS = "weights.safetensors"
META = "meta.json"
# The norms a checkpoint may record: the names of `attacks.NORMS` (a layer below this one;
# tests/test_models.py checks that the two agree).
THREAT_NORMS = ("linf", "l2", "l1")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex): the content hash every sidecar records."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_checkpoint(model: BlockNet, directory: str | Path, meta: dict | None = None) -> Path:
    """Save `model` to `directory` (created); `meta` is merged into the JSON sidecar."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, tmp)
    sidecar = {
        "model": model.spec.to_dict(),
        **(meta or {}),
        "package_version": __version__,
        "sha256": file_sha256(directory / WEIGHTS),
    }
    atomic_write_text(directory / META, json.dumps(sidecar, indent=2, default=str))
    return directory


def checkpoint_sha256(directory: str | Path) -> str:
    """The content hash of a checkpoint's weights, checked against its sidecar's "sha256" (a
    mismatch is a `UserError`: corrupt weights). A study puts it into the run ids of the runs
    that read the checkpoint, so that another checkpoint at the same path never reuses them."""
    recorded = read_meta(directory).get("sha256")
    sha = file_sha256(Path(directory) / WEIGHTS)
    if recorded is not None and recorded != sha:
        raise UserError(f"checkpoint {str(directory)!r} is corrupt: its weights do not match "
                        "the sha256 its meta.json records")
    return sha


def read_meta(directory: str | Path) -> dict:
    """The JSON sidecar of a checkpoint, or `UserError` naming what is wrong."""
    directory = Path(directory)
    meta_path = directory / META
    if not directory.is_dir() or not meta_path.is_file() or not (directory / WEIGHTS).is_file():
        raise UserError(
            f"no checkpoint at {str(directory)!r}: expected a directory with {WEIGHTS} and {META}"
        )
    try:
        meta = json.loads(meta_path.read_text())
        ModelSpec.from_dict(meta["model"])
        check_threat_record(meta)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"corrupt checkpoint metadata {str(meta_path)!r}: {e}") from None
    return meta


def check_threat_record(meta: dict) -> None:
    """`ValueError` naming the field unless the recorded training threat model is usable:
    `eps` (when present) a finite number >= 0, `norm` (when present) one of `THREAT_NORMS`,
    the recipe's smoothing noise `sigma` (when present) a finite number > 0 (every fine-tuned
    row records it). All optional (an imported checkpoint without a known threat model has
    none)."""
    eps = meta.get("eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float)
                            or not math.isfinite(eps) or eps < 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    norm = meta.get("norm")
    if norm is not None and norm not in THREAT_NORMS:
        raise ValueError(f"norm must be one of {', '.join(THREAT_NORMS)}, got {norm!r}")
    recipe = meta.get("recipe")
    sigma = recipe.get("sigma") if isinstance(recipe, dict) else None
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, int | float)
                              or not math.isfinite(sigma) or sigma <= 0):
        raise ValueError(f"recipe.sigma must be a finite number > 0, got {sigma!r}")


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[BlockNet, dict]:
    """Rebuild the model from the metadata alone, load its weights, return (model, meta).

    The model comes back in eval mode. A hash mismatch or unreadable weights is a `UserError`.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if "sha256" in meta and file_sha256(directory / WEIGHTS) != meta["sha256"]:
        raise UserError(f"checkpoint {str(directory)!r} is corrupt: weights do not match sha256")
    model = build_model(ModelSpec.from_dict(meta["model"]))
    try:
        model.load_state_dict(load_file(directory / WEIGHTS))
    except (SafetensorError, RuntimeError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"corrupt checkpoint weights in {str(directory)!r}: {first}") from None
    return model.to(device).eval(), meta
