"""A checkpoint's source card: the typed form of its `meta.json` sidecar, read and written
here only.

A checkpoint is a directory with `weights.safetensors` and `meta.json`. The sidecar records
what rebuilds the model (`model`: arch, classes, normaliser) and what the studies read back:
the role, the task, the training recipe, the threat model (eps/norm), the method, metrics,
seed, a planted backdoor, a teacher, a watermark, the source of a fine-tune, the defense of
a defended model, and the weights' content hash (model cards, Mitchell et al. 2019, in the
form a program reads).

The JSON on disk keeps the format every earlier version wrote: a field that is not set
(None) is absent from the file, values are stored as given (no coercion), and keys this
version does not know are kept in `extra` and written back. `card_from_meta` validates a
sidecar, naming the bad field, so a corrupt file is one clear error at load time instead of
a traceback later.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from robust_transfer.atomic import atomic_write_text
from robust_transfer.errors import UserError
from robust_transfer.models.base import ModelSpec

WEIGHTS = "weights.safetensors"
META = "meta.json"
# The norms a checkpoint may record: the names of `attacks.NORMS` (a layer below this one;
# tests/test_bad_checkpoints.py checks that the two agree).
THREAT_NORMS = ("linf", "l2", "l1")


@dataclass
class SourceCard:
    """What a checkpoint's `meta.json` says about its model; every field optional (None:
    not recorded), since imported and older checkpoints record less.

    Example:
        card = SourceCard(role="source", task="digits-0to4", eps=0.5, norm="l2", seed=0)
        save_checkpoint(model, "runs/l2", card); read_card("runs/l2").eps  # 0.5
    """

    # what rebuilds the model (filled in by `save_checkpoint` from the model itself)
    model: ModelSpec | None = None
    # every checkpoint: "source" (also when unrecorded), "finetune" or "defended"
    role: str | None = None
    # a trained source (`train.source_card`): its `SourceConfig.to_dict()` and the threat
    # model, method, seed and task it names
    recipe: dict | None = None
    eps: float | None = None
    norm: str | None = None
    method: str | None = None
    seed: int | None = None
    task: str | None = None  # the task it classifies ("" for an import: unknown)
    metrics: dict | None = None
    torch_threads: int | None = None  # CPU sums depend on the thread count
    amp: bool | None = None  # bf16 autocast in training
    distill: dict | None = None  # a distilled student: its `DistillConfig`
    backdoor: dict | None = None  # a planted backdoor: its config, poisoned count/indices
    teacher_path: str | None = None  # a grid's distilled source: its teacher's directory
    watermark: dict | None = None  # a watermarked source: key seed, trigger size, repeats
    comparison: list | None = None  # `distill`: the student/teacher comparison rows
    eval: dict | None = None  # `distill`: the attack the comparison used
    imported_from: dict | None = None  # `import-checkpoint`: the foreign file's provenance
    # a fine-tuned model: its source's path and columns, its `FinetuneConfig`, its epochs
    source: dict | None = None
    finetune: dict | None = None
    history: list | None = None
    # a defended model (`backdoor-defend`)
    defense: str | None = None
    defense_config: dict | None = None
    source_checkpoint: str | None = None
    # written by `save_checkpoint`
    package_version: str | None = None
    sha256: str | None = None
    # sidecar keys this version does not know, kept as they are
    extra: dict = field(default_factory=dict)

    @property
    def is_source(self) -> bool:
        """Whether this is a source model (role "source", or unrecorded: older checkpoints)."""
        return self.role in (None, "source")

    @property
    def train_recipe(self) -> dict:
        """The recipe's `train` section (`TrainConfig.to_dict()`), {} when unrecorded."""
        return (self.recipe or {}).get("train") or {}

    def recorded(self) -> set[str]:
        """The keys its `meta.json` holds (the set fields and the extra keys)."""
        return set(self.to_meta())

    def to_meta(self) -> dict:
        """The sidecar's JSON object: the set fields in declaration order, then the extra
        keys, then `package_version` and `sha256` last (as every version wrote them)."""
        out = {f: getattr(self, f) for f in _FIELDS if getattr(self, f) is not None}
        if self.model is not None:
            out["model"] = self.model.to_dict()
        tail = {k: out.pop(k) for k in ("package_version", "sha256") if k in out}
        return {**out, **self.extra, **tail}


_FIELDS = tuple(f.name for f in fields(SourceCard) if f.name != "extra")
_HINTS = typing.get_type_hints(SourceCard)


def card_from_meta(meta: dict) -> SourceCard:
    """The card of a sidecar's JSON object; `ValueError` naming the field when a value does
    not fit (a model spec that cannot be built, eps not a finite number >= 0, an unknown
    norm, a recipe's smoothing sigma not > 0, a field of the wrong type)."""
    if not isinstance(meta, dict):
        raise ValueError(f"the metadata must be a JSON object, got {type(meta).__name__}")
    known = {k: v for k, v in meta.items() if k in _FIELDS and v is not None}
    for name, value in known.items():
        if name not in ("model", "eps"):
            _check_type(name, value)
    check_threat_record(known)
    if "model" in known:
        if not isinstance(known["model"], dict):
            raise ValueError(f"model must be a JSON object, got {known['model']!r}")
        known["model"] = ModelSpec.from_dict(known["model"])
    extra = {k: v for k, v in meta.items() if k not in _FIELDS}
    return SourceCard(**known, extra=extra)


def _check_type(name: str, value: Any) -> None:
    """`ValueError` naming the field unless `value` is of the field's declared type."""
    kind = next(t for t in typing.get_args(_HINTS[name]) if t is not types.NoneType)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ValueError(f"{name} must be a {_KIND_NAMES[kind]}, got {value!r}")


_KIND_NAMES = {str: "string", int: "integer", bool: "boolean", dict: "JSON object",
               list: "JSON list"}


def check_threat_record(raw: dict) -> None:
    """`ValueError` naming the field unless the recorded training threat model is usable:
    `eps` (when present) a finite number >= 0, `norm` (when present) one of `THREAT_NORMS`,
    the recipe's smoothing noise `sigma` (when present) a finite number > 0 (every fine-tuned
    row records it). All optional (an imported checkpoint without a known threat model has
    none)."""
    eps = raw.get("eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float)
                            or not math.isfinite(eps) or eps < 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    norm = raw.get("norm")
    if norm is not None and norm not in THREAT_NORMS:
        raise ValueError(f"norm must be one of {', '.join(THREAT_NORMS)}, got {norm!r}")
    recipe = raw.get("recipe")
    sigma = recipe.get("sigma") if isinstance(recipe, dict) else None
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, int | float)
                              or not math.isfinite(sigma) or sigma <= 0):
        raise ValueError(f"recipe.sigma must be a finite number > 0, got {sigma!r}")


def read_card(directory: str | Path) -> SourceCard:
    """The card of the checkpoint in `directory`, or `UserError` naming what is wrong (no
    checkpoint there, unreadable JSON, a missing or bad field)."""
    directory = Path(directory)
    path = directory / META
    if not directory.is_dir() or not path.is_file() or not (directory / WEIGHTS).is_file():
        raise UserError(
            f"no checkpoint at {str(directory)!r}: expected a directory with {WEIGHTS} and {META}"
        )
    try:
        meta = json.loads(path.read_text())
        card = card_from_meta(meta)
        if card.model is None:
            raise KeyError("model")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"corrupt checkpoint metadata {str(path)!r}: {e}") from None
    return card


def write_card(directory: str | Path, card: SourceCard) -> Path:
    """Write `card` as the `meta.json` of `directory` (atomically); its path."""
    path = Path(directory) / META
    atomic_write_text(path, json.dumps(card.to_meta(), indent=2, default=str))
    return path
