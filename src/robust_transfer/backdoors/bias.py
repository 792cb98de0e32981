"""Bias transfer (Salman et al. 2022, "When does bias transfer in transfer learning?",
arXiv 2207.02842): a spurious feature planted in the source, and how far it moves a target
model's predictions.

- The biased source: the feature (a trigger of `data.triggers`: a BadNets square like the
  paper's yellow square, or a blended fixed random pattern like its fixed Gaussian pattern)
  on *all* training images of some source classes (one by default), labels kept.
  That is clean-label poisoning at rate 1 (`bias_backdoor`), so the source is trained by the
  one poisoning path (`train.train_source` via `SourceConfig.backdoor`).
- The prediction shift: the target task has no class the feature belongs to, so, as in the
  paper, we ask whether adding the feature to target test images pushes predictions towards
  *one* class. For each target class c, over the test images whose label is not c,

      shift_c = P(pred(x + feature) = c) - P(pred(x) = c),

  and the shift is max_c shift_c, reported with its class c*. A model whose predictions
  ignore the feature has shift exactly 0; the max over K classes is biased upwards under
  noise, so a source trained without the feature (same seeds) is the baseline.
- The flip rate at c*: the share of those test images (label not c*) whose prediction moves
  to c* when the feature is added (pred(x) != c*, pred(x + feature) = c*). The shift is this
  minus the share that moves away from c*, so flip rate >= shift. Salman et al. plot the
  flip rate: their attack success rate counts the images the feature sends to the class,
  without subtracting those it sends away.
- The de-biased target (the paper's Section 3): the feature added to the same share of every
  target class's training images, so that in the target data it says nothing about the label
  (`DebiasedFeature`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.backdoors.metrics import clean_and_triggered_predictions
from robust_transfer.data.datasets import ImageSet
from robust_transfer.data.poison import BackdoorConfig
from robust_transfer.data.triggers import TRIGGERS, Trigger
from robust_transfer.errors import UserError, check_choice


def bias_backdoor(bias_classes: int | tuple[int, ...], feature: str = "blended",
                  patch_size: int | None = None,
                  trigger_options: dict | None = None) -> BackdoorConfig:
    """The poisoning that plants a spurious `feature` on every training image of the
    `bias_classes` (one class or several) with labels kept (clean-label, rate 1; the first
    class is the config's target, the others its `also_classes`). Its seed is fixed (0): the
    feature (e.g. the blended pattern) is the object of study, the same for every run seed.
    `trigger_options`: the feature's trigger options (e.g. {"alpha": 0.3} for blended).

    Example:
        cfg = SourceConfig(task="digits-0to4", backdoor=bias_backdoor((0, 3)))
    """
    check_choice("bias feature", feature, TRIGGERS)
    classes = (bias_classes,) if isinstance(bias_classes, int) else tuple(bias_classes)
    if not classes:
        raise UserError("give at least one bias class")
    return BackdoorConfig(attack=feature, rate=1.0, target=classes[0], clean_label=True,
                          seed=0, patch_size=patch_size, also_classes=classes[1:],
                          trigger_options=trigger_options or {})


def shift_from_predictions(clean: torch.Tensor, triggered: torch.Tensor, y: torch.Tensor,
                           num_classes: int) -> dict:
    """The prediction shift of the module docstring from predicted labels (vectorised over
    classes): {"prediction_shift", "shift_class", "shift_clean_share",
    "shift_triggered_share", "flip_rate" (at the shift class), "shifts", "clean_accuracy"}.
    Ties go to the lowest class.

    Shape: clean, triggered, y (N,) int64; shifts: a list of K floats (NaN for a class every
    image belongs to).

    Example:
        shift_from_predictions(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([0, 1]), 2)
        # class 1: the image of class 0 moves to it -> prediction_shift 1.0, shift_class 1
    """
    if not len(clean) == len(triggered) == len(y):
        raise UserError(f"{len(clean)} clean and {len(triggered)} triggered predictions for "
                        f"{len(y)} labels")
    if len(y) == 0:
        raise UserError("the prediction shift needs at least one test image")
    classes = torch.arange(num_classes)
    others = (y[:, None] != classes[None]).double()  # (N, K): image not of class c
    n = others.sum(0)
    clean_share = (F.one_hot(clean, num_classes).double() * others).sum(0) / n
    triggered_share = (F.one_hot(triggered, num_classes).double() * others).sum(0) / n
    shifts = triggered_share - clean_share
    c = int(torch.argmax(torch.nan_to_num(shifts, nan=-math.inf)))
    flipped = (y != c) & (clean != c) & (triggered == c)
    return {"prediction_shift": float(shifts[c]), "shift_class": c,
            "shift_clean_share": float(clean_share[c]),
            "shift_triggered_share": float(triggered_share[c]),
            "flip_rate": float(flipped.double().sum() / n[c]),
            "shifts": shifts.tolist(), "clean_accuracy": float((clean == y).double().mean())}


def prediction_shift(model: nn.Module, x: torch.Tensor, y: torch.Tensor, feature: Trigger,
                     batch_size: int = 1024) -> dict:
    """How far adding `feature` to test images `x` moves `model`'s predictions towards one
    class (`shift_from_predictions`), with the clean accuracy on `x`.

    Shape: x (N, C, H, W) in [0,1], y (N,).

    Example:
        m = prediction_shift(target_model, test.x, test.y, bias_backdoor(0).trigger((1, 8, 8)))
        m["prediction_shift"], m["shift_class"]
    """
    if len(x) != len(y):
        raise UserError(f"{len(x)} images but {len(y)} labels")
    clean, triggered, num_classes = clean_and_triggered_predictions(model, x, feature,
                                                                    batch_size)
    return shift_from_predictions(clean, triggered, y.cpu(), num_classes)


class DebiasedFeature:
    """A de-biasing transform of a training set: `feature` on round(share * n_c) images of
    every class c (rounding half up; the images drawn with `seed`), so that the feature is as
    common in every class and carries no label information.

    Shape: ImageSet (N, C, H, W) -> ImageSet, same shape and labels.

    Example:
        debias = DebiasedFeature(bias_backdoor(0).trigger((1, 8, 8)), share=0.5, seed=0)
        finetune(model, cfg, train_transform=debias)
    """

    def __init__(self, feature: Trigger, share: float = 0.5, seed: int = 0) -> None:
        if isinstance(share, bool) or not 0.0 < share <= 1.0:
            raise UserError(f"de-biasing share must be in (0, 1], got {share!r}")
        self.feature, self.share, self.seed = feature, float(share), int(seed)

    def chosen(self, y: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the images that get the feature."""
        if len(y) == 0:
            return torch.zeros(0, dtype=torch.bool)
        gen = torch.Generator().manual_seed(self.seed)
        key = torch.rand(len(y), generator=gen, dtype=torch.float64)
        order = torch.argsort(y.double() + key)  # by class, random within a class
        counts = torch.bincount(y)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(y)) - starts[y[order]]
        wanted = torch.floor(self.share * counts.double() + 0.5).long()
        return rank < wanted[y]

    def __call__(self, data: ImageSet) -> ImageSet:
        mask = self.chosen(data.y)
        x = data.x.clone()
        x[mask] = self.feature.apply(data.x[mask])
        return ImageSet(x, data.y)
