"""Import checkpoints trained elsewhere (MadryLab `robustness`, torchvision, plain state
dicts) into this package's safetensors + JSON checkpoints.

A pretrained model is an attack surface (this project's subject): a pickle can run any code
while it loads. So files are read only with `torch.load(weights_only=True)` (the restricted
unpickler: tensors, containers and numbers, no code) or as safetensors; a file that needs
anything else (a dill or full pickle of objects) is refused before any of its code runs,
with the way to convert it safely.

Layouts read:
- `robustness` (Engstrom et al., MadryLab; Salman et al. 2020 `robust-models-transfer`): a
  dict with `model` (older: `state_dict`), `optimizer`, `schedule`, `epoch`, `nat_prec1`,
  `adv_prec1`; keys `module.model.<torchvision names>`, a duplicate
  `module.attacker.model.<same>` (dropped), and `module.normalizer.new_mean|new_std`
  shaped [3, 1, 1] (the normaliser, which our model keeps inside).
- `torchvision`: a state dict of torchvision names (optionally under `module.`); the
  normaliser is torchvision's ImageNet mean/std unless --mean/--std say otherwise.
- `state-dict`: any state dict of our names (`normalizer.mean|std` if present, else
  --mean/--std are required); `module.`/`model.` prefixes are stripped.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.card import SourceCard
from robust_transfer.models.checkpoint import file_sha256, save_checkpoint
from robust_transfer.models.nets import ARCHS, BlockNet, ModelSpec, build_model

FORMATS = ("robustness", "torchvision", "state-dict")
# torchvision's ImageNet normalisation (torchvision.models docs), used for --format torchvision.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PREFIXES = ("module.", "model.")
_NORMALISER = {"normalizer.new_mean": "mean", "normalizer.new_std": "std",
               "normalizer.mean": "mean", "normalizer.std": "std"}


def convert_hint(path: Path) -> str:
    return (f"if you trust {path.name}, convert it in a trusted, isolated environment: "
            "torch.load it with weights_only=False and save only its state dict "
            "(safetensors.torch.save_file(state_dict, 'weights.safetensors') or "
            "torch.save(model.state_dict(), 'weights.pt')), then import that file")


def read_foreign(path: str | Path) -> dict:
    """The object stored in `path`, loaded without running code: safetensors (by suffix) or
    `torch.load(weights_only=True, map_location="cpu")`. Anything else is a `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read safetensors file {str(path)!r}: {e}") from None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # The restricted unpickler names the global (a function or class: code) it refused.
        found = re.search(r"(GLOBAL [\w.]+)", str(e))
        if found is None:
            raise UserError(f"cannot read {str(path)!r} as a PyTorch file: not a pickle of "
                            "tensors (corrupt, or another format)") from None
        raise UserError(f"refusing {str(path)!r}: unpickling it needs code, which could do "
                        f"anything ({found.group(1)}); {convert_hint(path)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {str(path)!r} as a PyTorch file: {first[:200]}") from None


def _state_dict(obj, fmt: str, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        raise UserError(f"{str(path)!r} holds no state dict: expected tensors, or a dict with "
                        f"'model' or 'state_dict' (format {fmt})")
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _strip(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(weights under our names, normaliser {'mean', 'std'} if found): strips `module.` and
    `model.` prefixes, drops robustness's duplicate `attacker.*` copy."""
    weights, normaliser = {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = _strip(key)
        if name.startswith("attacker."):
            continue
        if name in _NORMALISER:
            normaliser[_NORMALISER[name]] = tuple(float(v) for v in value.flatten())
        else:
            weights[name] = value
    return weights, normaliser


def _scalar(value) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return float(value) if isinstance(value, int | float) else None


def check_state(model: BlockNet, weights: dict[str, torch.Tensor], arch: str) -> None:
    """`UserError` naming the first key whose presence or shape differs from `arch`'s layout
    (the normaliser's buffers and BatchNorm's `num_batches_tracked` may be absent)."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("normalizer.")}
    for key, tensor in expected.items():
        if key not in weights:
            if key.endswith("num_batches_tracked"):
                continue
            raise UserError(f"the file has no key {key!r}, which arch {arch!r} needs (is it "
                            "another architecture, or another --format?)")
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise UserError(f"key {key!r} has shape {tuple(weights[key].shape)} in the file but "
                            f"{tuple(tensor.shape)} in arch {arch!r}")
    extra = [k for k in weights if k not in expected]
    if extra:
        raise UserError(f"the file has key {extra[0]!r}, which arch {arch!r} does not (is it "
                        "another architecture?)")


def import_checkpoint(
    path: str | Path,
    fmt: str,
    arch: str,
    out: str | Path,
    num_classes: int | None = None,
    eps: float | None = None,
    norm: str | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    input_size: int | None = None,
) -> Path:
    """Convert the checkpoint `path` (format `fmt`, architecture `arch`) into a source
    checkpoint directory `out` that `finetune`, `grid` and `explain` accept.

    The normaliser comes from the file (robustness, or our own names), else `mean`/`std`
    (torchvision: ImageNet's by default). `eps`/`norm` record the threat model the source was
    trained against when the user knows it (files do not say; without them the source counts
    as natural). `num_classes`, when given, must match the file's head. `input_size` records
    the image size the source expects, so fine-tuning resizes targets to it.

    Example:
        import_checkpoint("imagenet_l2_3_0.pt", "robustness", "resnet50", "runs/l2-3",
                          eps=3.0, norm="l2")
    """
    check_choice("format", fmt, FORMATS)
    check_choice("arch", arch, ARCHS)
    if (eps is None) != (norm is None):
        raise UserError("give --eps and --norm together (the source's training threat model)")
    if eps is not None and not eps >= 0:
        raise UserError(f"eps must be >= 0, got {eps}")
    if (mean is None) != (std is None):
        raise UserError("give --mean and --std together")
    if input_size is not None and input_size < 1:
        raise UserError(f"input size must be >= 1, got {input_size}")
    path = Path(path)
    obj = read_foreign(path)
    weights, normaliser = split_state(_state_dict(obj, fmt, path))
    if mean is not None:
        normaliser = {"mean": tuple(mean), "std": tuple(std)}
    elif not normaliser and fmt == "torchvision":
        normaliser = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    elif fmt == "robustness" and not normaliser:
        raise UserError(f"{str(path)!r} has no module.normalizer.new_mean/new_std; is it a "
                        "robustness checkpoint? (give --mean/--std to supply the normaliser)")
    elif not normaliser:
        raise UserError(f"{str(path)!r} has no normaliser (normalizer.mean/std); give --mean "
                        "and --std (the per-channel values the model was trained with)")
    spec = _spec(arch, weights, normaliser, num_classes, input_size)
    model = build_model(spec)
    check_state(model, weights, arch)
    full = {**model.state_dict(), **{k: v.float() if v.is_floating_point() else v
                                     for k, v in weights.items()}}
    model.load_state_dict(full)
    info = _provenance(path, fmt, obj)
    # robustness reports percentages on its own (source) test set
    metrics = {ours: info[theirs] / 100 for ours, theirs in
               (("clean_accuracy", "nat_prec1"), ("robust_accuracy", "adv_prec1"))
               if theirs in info}
    card = SourceCard(role="source", task="", seed=0, imported_from=info,
                      eps=None if eps is None else float(eps), norm=norm,
                      metrics=metrics or None)
    return save_checkpoint(model.eval(), out, card)


def _spec(arch: str, weights: dict, normaliser: dict, num_classes: int | None,
          input_size: int | None) -> ModelSpec:
    head_key = f"{ARCHS[arch].build.head_attr}.weight"  # the classifier: fc, linear, head
    stem_key = next((k for k, v in weights.items() if v.ndim == 4), None)  # the first conv
    for key in (head_key, stem_key):
        if key is None or key not in weights:
            raise UserError(f"the file has no key {key or 'conv1.weight'!r}, which arch "
                            f"{arch!r} needs (is it another architecture, or another --format?)")
    classes, channels = int(weights[head_key].shape[0]), int(weights[stem_key].shape[1])
    if num_classes is not None and num_classes != classes:
        raise UserError(f"--num-classes {num_classes} does not match the file: key "
                        f"{head_key!r} has {classes} outputs")
    if len(normaliser["mean"]) != channels or len(normaliser["std"]) != channels:
        raise UserError(f"the normaliser has {len(normaliser['mean'])} values but the model "
                        f"takes {channels} channels (key {stem_key!r})")
    return ModelSpec(arch, classes, channels, normaliser["mean"], normaliser["std"], input_size)


def _provenance(path: Path, fmt: str, obj) -> dict:
    info = {"path": str(path), "format": fmt, "sha256": file_sha256(path)}
    if isinstance(obj, dict):
        for key in ("epoch", "nat_prec1", "adv_prec1"):
            value = _scalar(obj.get(key))
            if value is not None:
                info[key] = value
    return info
