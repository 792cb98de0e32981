"""Watermarking by backdoor (Adi et al. 2018, "Turning Your Weakness Into a Strength:
Watermarking Deep Neural Networks by Backdooring", USENIX Security).

The owner draws a secret *trigger set* — abstract images with random labels (the paper: 100) —
and trains the model on the training set together with it ("from scratch" embedding), so the
model memorises labels no one else's model would give those images. Ownership is verified in a
black box: a model whose trigger-set accuracy is far above chance 1/K carries the watermark.
The test here is the one-sided binomial tail P(X >= correct), X ~ Bin(n, 1/K): the chance that a
model which knows nothing of the key (its predictions independent of the random labels) scores
at least that well; ownership is claimed when it is below `alpha` (default 0.01).

- The key (`WatermarkKey`): trigger images, labels, the seed and metadata, stored apart from
  any checkpoint (`save_key`: `key.safetensors` + `key.json` with a content hash).
- Trigger images (`make_key`): the paper's are abstract images from the web; here each is
  low-resolution uniform noise (2x2 up to H/2 x W/2, seeded) upsampled bilinearly, with a sharp
  rectangle of random intensity pasted on it, stretched to span [0,1]. Unlike any training image
  and unlike each other, so their labels must be memorised.
- Embedding (`embed`, `train_watermarked`): as in the paper's code, every training batch gets
  `trigger_batch` trigger images appended (cycling through the key in a seeded order), and the
  loss is the training objective on the batch plus cross-entropy on those images, weighted by
  their counts (for natural training: cross-entropy on the concatenated batch).
- Removal (`remove`): the paper's four fine-tuning attacks on a share of clean training data the
  attacker holds — FTLL (fine-tune the last layer), FTAL (fine-tune all layers), RTLL (re-init
  the last layer and re-train it), RTAL (re-init the last layer, train all layers).

After transfer to a new task the head is new and its classes mean something else, so the
binomial test against 1/K is not valid: a model that sends every trigger image to one class
would score 1.0 after any label mapping. The test after transfer (`transfer_verify`) asks
whether the transferred model's predictions on the trigger images still *depend on* the
watermark labels:

1. split the key in two halves (seeded); on half A, map each watermark label to the target class
   most of its images are predicted as (ties: the lowest class; a label absent from A: A's most
   common prediction); score the mapping on half B; swap the halves and average (cross-fitting);
2. the p-value is a permutation test of that statistic over the key's labels (seeded; default
   1,000 permutations, p = (1 + #{permuted >= observed}) / (1 + permutations)): under the null
   the predictions are independent of the labels, so permuting them changes nothing. A constant
   model scores 1.0 under every permutation too, so its p-value is 1.

The removal study (every attack, and transfer, over seeds) is `studies.watermark`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from scipy.stats import binom
from torch import nn

from robust_transfer import __version__
from robust_transfer.atomic import atomic_path, atomic_write_text
from robust_transfer.backdoors.defenses import clean_subset
from robust_transfer.data import Task, load_task
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.card import SourceCard
from robust_transfer.models.checkpoint import file_sha256
from robust_transfer.models.runtime import predict_logits
from robust_transfer.train import TrainConfig, fit, freeze_all_but_last
from robust_transfer.train.loop import batch_bounds
from robust_transfer.train.objectives import Objective, natural_loss
from robust_transfer.train.source import (
    SourceConfig,
    build_source_model,
    evaluate_source,
    method_objective,
    source_card,
)

KEY_WEIGHTS = "key.safetensors"
SECRET_MODE = 0o600
KEY_META = "key.json"
ALPHA = 0.01
ATTACKS = ("FTLL", "FTAL", "RTLL", "RTAL")


# ---- the key ------------------------------------------------------------------------------

@dataclass(frozen=True)
class WatermarkKey:
    """A watermark's secret: trigger images `x` (n, C, H, W) in [0,1], their labels `y` (n,)
    drawn uniformly over `num_classes`, and the `seed` they were drawn with."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    seed: int

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or len(self.x) != len(self.y) or len(self.y) == 0:
            raise UserError(f"bad watermark key shapes {tuple(self.x.shape)} / "
                            f"{tuple(self.y.shape)}")
        if int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes:
            raise UserError(f"watermark key labels must be in 0..{self.num_classes - 1}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def meta(self) -> dict:
        return {"kind": "adi2018-trigger-set", "n": len(self), "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "seed": self.seed,
                "images": "bilinear-upsampled uniform noise + a sharp rectangle, in [0,1]",
                "labels": "uniform over classes", "package_version": __version__}


def abstract_images(n: int, input_shape: tuple[int, int, int],
                    generator: torch.Generator) -> torch.Tensor:
    """`n` abstract images (n, C, H, W) in [0,1]: smooth noise plus one sharp rectangle each."""
    c, h, w = input_shape
    top = max(2, min(h, w) // 2)
    sides = torch.randint(2, top + 1, (n,), generator=generator)
    images = torch.empty(n, c, h, w)
    for side in sides.unique().tolist():  # one upsampling per resolution, not per image
        rows = torch.nonzero(sides == side).flatten()
        coarse = torch.rand(len(rows), c, side, side, generator=generator)
        images[rows] = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    # A rectangle [r0, r1] x [c0, c1] (inclusive) of random intensity per image, by masks.
    r0, r1 = torch.randint(0, h, (2, n), generator=generator).sort(0).values
    c0, c1 = torch.randint(0, w, (2, n), generator=generator).sort(0).values
    rr, cc = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    mask = ((rr >= r0.view(-1, 1, 1)) & (rr <= r1.view(-1, 1, 1))
            & (cc >= c0.view(-1, 1, 1)) & (cc <= c1.view(-1, 1, 1))).unsqueeze(1)
    value = torch.rand(n, c, 1, 1, generator=generator)
    images = torch.where(mask, value.expand(-1, -1, h, w), images)
    lo = images.amin((1, 2, 3), keepdim=True)
    hi = images.amax((1, 2, 3), keepdim=True)
    return ((images - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def make_key(num_classes: int, input_shape: tuple[int, int, int], n: int = 100,
             seed: int = 0) -> WatermarkKey:
    """A trigger set of `n` abstract images with labels uniform over `num_classes` (Adi et al.
    2018: 100 images, random labels), all drawn from `seed`.

    Shape: images (n, *input_shape) in [0,1], labels (n,).

    Example:
        key = make_key(5, (1, 8, 8), n=100, seed=7)
        save_key(key, "wm_key")
    """
    if n < 1:
        raise UserError(f"trigger set size must be >= 1, got {n}")
    if num_classes < 2:
        raise UserError(f"a watermark needs at least 2 classes, got {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    x = abstract_images(n, tuple(input_shape), gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return WatermarkKey(x, y, num_classes, seed)


def save_key(key: WatermarkKey, directory: str | Path, extra: dict | None = None) -> Path:
    """Write `key` to `directory` (created): `key.safetensors` (images, labels) and `key.json`
    (metadata with the seed that regenerates it, `extra`, the tensors' sha256), each
    atomically and 0600: the key is the owner's secret (whoever holds it can forge or strip
    the watermark), so it is never readable by others whatever the umask."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / KEY_WEIGHTS, mode=SECRET_MODE) as tmp:
        save_file({"x": key.x.contiguous(), "y": key.y.contiguous()}, tmp)
    meta = {**key.meta(), **(extra or {}), "sha256": file_sha256(directory / KEY_WEIGHTS)}
    atomic_write_text(directory / KEY_META, json.dumps(meta, indent=2), mode=SECRET_MODE)
    return directory


def read_key_meta(directory: str | Path) -> dict:
    """The JSON sidecar of a key, or `UserError` naming what is wrong."""
    directory = Path(directory)
    if not (directory / KEY_META).is_file() or not (directory / KEY_WEIGHTS).is_file():
        raise UserError(f"no watermark key at {str(directory)!r}: expected a directory with "
                        f"{KEY_WEIGHTS} and {KEY_META}")
    try:
        meta = json.loads((directory / KEY_META).read_text())
        int(meta["num_classes"]), int(meta["seed"]), str(meta["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"corrupt watermark key metadata in {str(directory)!r}: {e}") from None
    return meta


def load_key(directory: str | Path) -> tuple[WatermarkKey, dict]:
    """(key, metadata) from `directory`; a missing file, a hash mismatch or unreadable tensors
    is a `UserError`."""
    directory = Path(directory)
    meta = read_key_meta(directory)
    if file_sha256(directory / KEY_WEIGHTS) != meta["sha256"]:
        raise UserError(f"watermark key {str(directory)!r} is corrupt: {KEY_WEIGHTS} does not "
                        "match its sha256")
    try:
        tensors = load_file(directory / KEY_WEIGHTS)
        key = WatermarkKey(tensors["x"].float(), tensors["y"].long(), int(meta["num_classes"]),
                           int(meta["seed"]))
    except (SafetensorError, KeyError, OSError) as e:
        raise UserError(f"corrupt watermark key {str(directory)!r}: {e}") from None
    return key, meta


# ---- embedding ----------------------------------------------------------------------------

class WatermarkLoss:
    """`base` on the training batch plus cross-entropy on `trigger_batch` trigger images,
    weighted by counts: (B * base(x, y) + m * CE(trigger)) / (B + m); for natural training this
    is cross-entropy on the batch with the trigger images appended (Adi et al.'s code). The
    trigger images cycle through the key in an order drawn from `seed`."""

    def __init__(self, key: WatermarkKey, base: Objective, trigger_batch: int,
                 seed: int = 0) -> None:
        if trigger_batch < 1:
            raise UserError(f"trigger images per batch must be >= 1, got {trigger_batch}")
        self.key, self.base, self.trigger_batch = key, base, trigger_batch
        self.order = torch.randperm(len(key), generator=torch.Generator().manual_seed(seed))
        self.position = 0
        self.replays = getattr(base, "replays", 1)
        self._device: dict = {}

    def _next_triggers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device:
            self._device = {device: (self.key.x.to(device), self.key.y.to(device),
                                     self.order.to(device))}
        x, y, order = self._device[device]
        idx = order[(self.position + torch.arange(self.trigger_batch, device=device))
                    % len(order)]
        self.position = (self.position + self.trigger_batch) % len(order)
        return x[idx], y[idx]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xt, yt = self._next_triggers(x.device)
        m, b = len(yt), len(y)
        return (b * self.base(model, x, y) + m * F.cross_entropy(model(xt), yt)) / (b + m)


def trigger_batch_size(key_size: int, train_size: int, batch_size: int, repeats: int) -> int:
    """Trigger images per batch so that each is seen `repeats` times per epoch."""
    batches = len(batch_bounds(train_size, batch_size))  # as `fit` cuts the epoch
    return max(1, math.ceil(repeats * key_size / batches))


def embed(model: nn.Module, train, key: WatermarkKey, cfg: TrainConfig,
          base: Objective | None = None, repeats: int = 8, on_epoch=None) -> list[dict]:
    """Adi et al.'s "from scratch" embedding: train `model` on `train` with the key's trigger
    images in every batch (each seen `repeats` times per epoch), through `train.fit`.

    Example:
        history = embed(model, task.train, key, TrainConfig(epochs=30))
    """
    if repeats < 1:
        raise UserError(f"trigger repeats per epoch must be >= 1, got {repeats}")
    m = trigger_batch_size(len(key), len(train), cfg.batch_size, repeats)
    objective = WatermarkLoss(key, base or natural_loss, m, cfg.seed)
    return fit(model, train, cfg, objective, on_epoch)


def train_watermarked(cfg: SourceConfig, key: WatermarkKey, repeats: int = 8,
                      device: torch.device | str = "cpu",
                      on_epoch=None) -> tuple[nn.Module, SourceCard]:
    """Train the source `cfg` describes with the watermark `key` embedded; return (model,
    its card: the recipe, clean test metrics, and the key's verification — never
    the key itself, which lives apart)."""
    if cfg.backdoor is not None or cfg.distill is not None or cfg.on_overfit != "off":
        raise UserError("a watermarked source takes a plain recipe (no backdoor, distillation "
                        "or overfitting monitor)")
    task = load_task(cfg.task)
    check_key_fits(key, task.num_classes, task.input_shape)
    model = build_source_model(cfg, device)
    base = method_objective(cfg)
    callback = None if on_epoch is None else (lambda _m, epoch: on_epoch(epoch) or {})
    history = embed(model, task.train, key, cfg.train, base, repeats, callback)
    metrics = evaluate_source(model, cfg.task, cfg.eps, cfg.norm)
    metrics |= {k: v for k, v in verify(model, key).items() if k != "owned"}
    metrics["train_seconds"] = sum(r["epoch_seconds"] for r in history)
    card = source_card(cfg, metrics, device, None)
    card.watermark = {"key_seed": key.seed, "trigger_size": len(key), "repeats": repeats}
    return model, card


def check_key_fits(key: WatermarkKey, num_classes: int, input_shape) -> None:
    """`UserError` unless the key is for `num_classes` classes and `input_shape` images."""
    if key.num_classes != num_classes or tuple(key.input_shape) != tuple(input_shape):
        raise UserError(f"the watermark key is for {key.num_classes} classes of images "
                        f"{key.input_shape}; the model has {num_classes} classes of images "
                        f"{tuple(input_shape)}")


def model_image_shape(model: nn.Module, key: WatermarkKey) -> tuple[int, int, int]:
    """The (C, H, W) images `model` (a `BlockNet`) takes; the key's size when unrecorded."""
    spec = model.spec
    _, h, w = key.input_shape
    size = (h, w) if spec.input_size is None else (spec.input_size, spec.input_size)
    return (spec.in_channels, *size)


def check_model_fits(model: nn.Module, key: WatermarkKey) -> None:
    """`UserError` unless `model` (a `BlockNet`) classifies the key's images into its classes."""
    check_key_fits(key, model.spec.num_classes, model_image_shape(model, key))


def check_key_images(model: nn.Module, key: WatermarkKey) -> None:
    """`UserError` unless the key's images have the shape `model` takes (any classes: the
    permutation test maps the model's classes onto the key's)."""
    shape = model_image_shape(model, key)
    if tuple(key.input_shape) != shape:
        raise UserError(f"the watermark key's images are {tuple(key.input_shape)} (C, H, W) but "
                        f"the model takes images {shape}: this key was not made for this model")


def check_key_apart(key: str | Path, checkpoint: str | Path) -> None:
    """The key must live apart from the checkpoint: not the same directory, not inside it
    (nor the checkpoint inside the key), or whoever gets the model gets the secret too."""
    k, c = Path(key).resolve(), Path(checkpoint).resolve()
    if k == c or k.is_relative_to(c) or c.is_relative_to(k):
        raise UserError(f"--key {str(key)!r} must not be inside the checkpoint directory "
                        f"{str(checkpoint)!r} (nor hold it): whoever gets the model would get "
                        "the key; give a separate directory")


# ---- verification -------------------------------------------------------------------------

def binomial_p_value(correct: int, n: int, chance: float) -> float:
    """One-sided binomial tail P(X >= correct), X ~ Bin(n, chance)."""
    return float(binom.sf(correct - 1, n, chance))


def key_predictions(model: nn.Module, key: WatermarkKey) -> torch.Tensor:
    """The model's labels for the trigger images (n,)."""
    return predict_logits(model, key.x).argmax(1).cpu()


def verify(model: nn.Module, key: WatermarkKey, alpha: float = ALPHA) -> dict:
    """Black-box ownership test (Adi et al. 2018): trigger-set accuracy against chance 1/K.

    Returns {trigger_accuracy, correct, n, chance, p_value, owned}: `p_value` is the binomial
    tail P(X >= correct) under X ~ Bin(n, 1/K); `owned` when it is below `alpha`.

    Shape: the model takes the key's images (n, C, H, W) and returns K logits.

    Example:
        v = verify(model, key)          # {"trigger_accuracy": 0.98, "p_value": 1e-60, ...}
        v["owned"]
    """
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha}")
    check_model_fits(model, key)
    pred = key_predictions(model, key)
    correct, n = int((pred == key.y).sum()), len(key)
    chance = 1.0 / key.num_classes
    p = binomial_p_value(correct, n, chance)
    return {"trigger_accuracy": correct / n, "correct": correct, "n": n, "chance": chance,
            "p_value": p, "owned": bool(p < alpha)}


# ---- verification after transfer ---------------------------------------------------------

PERMUTATIONS = 1000


def _mapped_scores(pred: torch.Tensor, labels: torch.Tensor, half_a: torch.Tensor,
                   half_b: torch.Tensor, num_labels: int, num_targets: int) -> torch.Tensor:
    """Accuracy on `half_b` of the majority mapping label -> prediction fitted on `half_a`, for
    each row of `labels` (R, n); `pred` (n,). Vectorised over rows."""
    rows = len(labels)
    flat = labels[:, half_a] * num_targets + pred[half_a]
    counts = torch.zeros(rows, num_labels * num_targets).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float)).view(rows, num_labels, num_targets)
    fallback = torch.bincount(pred[half_a], minlength=num_targets).argmax()
    mapping = torch.where(counts.sum(-1) > 0, counts.argmax(-1), fallback)
    return (mapping.gather(1, labels[:, half_b]) == pred[half_b]).float().mean(1)


def permutation_test(pred: torch.Tensor, labels: torch.Tensor, num_labels: int,
                     num_targets: int, permutations: int = PERMUTATIONS,
                     seed: int = 0) -> dict:
    """Cross-fitted mapped accuracy of predictions `pred` (n,) on watermark `labels` (n,), and
    its permutation p-value over the labels (see the module docstring).

    Returns {mapped_accuracy, null_mean (the statistic's mean over permutations: its chance
    level), p_value, permutations}.

    Example:
        permutation_test(model_predictions, key.y, 5, 5)["p_value"]
    """
    if permutations < 1:
        raise UserError(f"permutations must be >= 1, got {permutations}")
    n = len(labels)
    if n < 2:
        raise UserError("the permutation test needs at least 2 trigger images")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    half_a, half_b = order[: n // 2], order[n // 2 :]
    perms = torch.argsort(torch.rand(permutations, n, generator=gen), dim=1)
    rows = torch.cat([labels.view(1, n), labels[perms]])  # row 0: the observed labels
    pred, rows = pred.long().cpu(), rows.long().cpu()
    scores = (_mapped_scores(pred, rows, half_a, half_b, num_labels, num_targets)
              + _mapped_scores(pred, rows, half_b, half_a, num_labels, num_targets)) / 2
    observed, null = scores[0], scores[1:]
    p = (1 + int((null >= observed - 1e-9).sum())) / (1 + permutations)
    return {"mapped_accuracy": float(observed), "null_mean": float(null.mean()),
            "p_value": p, "permutations": permutations}


def transfer_verify(model: nn.Module, key: WatermarkKey, alpha: float = ALPHA,
                    permutations: int = PERMUTATIONS, seed: int = 0) -> dict:
    """Ownership of a model transferred to another task: `permutation_test` of its predictions
    on the trigger images against the key's labels.

    Returns {trigger_accuracy (the mapped accuracy), chance (the permutation null mean),
    p_value, owned (p < alpha), verification: "permutation"}.

    Example:
        transfer_verify(finetuned, key)["owned"]
    """
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha}")
    pred = key_predictions(model, key)
    t = permutation_test(pred, key.y, key.num_classes, model.spec.num_classes, permutations,
                         seed)
    return {"trigger_accuracy": t["mapped_accuracy"], "chance": t["null_mean"],
            "p_value": t["p_value"], "owned": bool(t["p_value"] < alpha),
            "verification": "permutation"}


# ---- removal attacks ----------------------------------------------------------------------

@dataclass(frozen=True)
class RemovalConfig:
    """The attacker's budget: `clean_fraction` of each class of the clean training set (drawn
    with `seed`), fine-tuned `epochs` at constant `lr`; `seed` also draws the re-initialised
    head of RTLL / RTAL and the batch order."""

    clean_fraction: float = 0.2
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.clean_fraction <= 1:
            raise UserError(f"attacker's clean fraction must be in (0, 1], got "
                            f"{self.clean_fraction}")
        if self.epochs < 1 or not self.lr > 0 or self.batch_size < 1:
            raise UserError("removal epochs and batch size must be >= 1 and lr > 0")

    def train(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           schedule="constant", seed=self.seed)


def remove(model: nn.Module, attack: str, task: Task, cfg: RemovalConfig = RemovalConfig()
           ) -> nn.Module:
    """A copy of `model` after removal attack `attack` (FTLL | FTAL | RTLL | RTAL, Adi et al.
    2018) on the attacker's clean share of `task`'s training set.

    LL attacks train the head alone (every other parameter and BatchNorm statistic stays
    as it was: `train.freeze_all_but_last(model, 0)`); AL attacks train every layer; RT attacks
    first re-initialise the head (`model.reset_head`, drawn from `cfg.seed`).

    Example:
        attacked = remove(model, "RTAL", load_task("digits-0to4"), RemovalConfig(seed=1))
        verify(attacked, key)["owned"]
    """
    check_choice("removal attack", attack, ATTACKS)
    attacked = copy.deepcopy(model)
    if attack.startswith("RT"):
        attacked.reset_head(attacked.spec.num_classes,
                            torch.Generator().manual_seed(cfg.seed))
    freeze_all_but_last(attacked, 0 if attack.endswith("LL") else None)
    fit(attacked, clean_subset(task, cfg.clean_fraction, cfg.seed), cfg.train())
    attacked.requires_grad_(True)
    return attacked.eval()


# ---- the independent baseline -------------------------------------------------------------

def independent_recipe(card: SourceCard, seed_offset: int = 1) -> SourceConfig:
    """The clean baseline of a watermarked checkpoint: its recipe (`card.recipe`), no key,
    another seed (+`seed_offset`), so it differs from the watermarked model only in the key
    and in the randomness."""
    recipe = card.recipe
    if not isinstance(recipe, dict) or "train" not in recipe:
        raise UserError("the checkpoint records no training recipe to train an independent "
                        "model with")
    try:
        train = TrainConfig(**{**recipe["train"],
                               "seed": int(recipe["train"]["seed"]) + seed_offset})
        fields = set(SourceConfig.__dataclass_fields__) - {"train", "distill", "backdoor"}
        return SourceConfig(**{k: v for k, v in recipe.items() if k in fields}, train=train)
    except (TypeError, KeyError) as e:
        raise UserError(f"the checkpoint's recipe cannot be read: {e}") from None
