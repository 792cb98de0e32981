"""Naive vs adaptive robust accuracy of input defenses, and the squeeze detector's rates.

The published story (Athalye et al. 2018, arXiv 1802.00420): input-transformation defenses
look robust when attacked naively, because their gradients are shattered (bit-depth
reduction) or stochastic (random resize and pad); BPDA and EOT bring robust accuracy back
down to about the undefended model's. `compare_defenses` measures both through the one
evaluation path (`attacks.evaluate`), records which gradient-masking checks fired on each,
and picks the adaptive attack from what each defense declares:

- a non-differentiable transform -> BPDA; a randomized one -> EOT (n draws); both -> both;
- a differentiable deterministic defense (median smoothing) -> its true gradient, which
  already is the adaptive attack: the naive numbers are reused.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from robust_transfer.attacks import GradientMaskingWarning, evaluate
from robust_transfer.attacks.adaptive import check_adaptive
from robust_transfer.attacks.registry import stages
from robust_transfer.defenses.detector import SqueezeDetector
from robust_transfer.defenses.parse import DefenseSpec
from robust_transfer.defenses.wrap import Defended
from robust_transfer.models.runtime import predict_logits

UNDEFENDED = "none"


def adaptive_options(defended: Defended, eot_samples: int) -> tuple[bool, int, str]:
    """(bpda, eot_samples, label) of the adaptive attack on `defended`."""
    bpda = not defended.differentiable
    eot = eot_samples if defended.randomized else 1
    label = "+".join(([f"EOT-{eot}"] if eot > 1 else []) + (["BPDA"] if bpda else []))
    return bpda, eot, label or "gradient"


def _evaluate(model, x, y, attacks, eps, norm, steps, seed, progress, bpda=False,
              eot_samples=1, examples=None) -> tuple[pd.DataFrame, list[str]]:
    """`attacks.evaluate`'s worst-case rows and the names of the masking checks that fired."""
    if isinstance(model, Defended):
        model.reseed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradientMaskingWarning)
        table = evaluate(model, x, y, attacks, eps, norm, steps, seed, progress=progress,
                         examples=examples, bpda=bpda, eot_samples=eot_samples)
    fired = []
    for w in caught:
        if isinstance(w.message, GradientMaskingWarning):
            if w.message.check not in fired:
                fired.append(w.message.check)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return table[table["attack"] == "worst case"].reset_index(drop=True), fired


def n_evaluations(defenses: Sequence[DefenseSpec], model: nn.Module) -> int:
    """How many `evaluate` runs `compare_defenses` makes (for a progress total)."""
    runs = 1
    for spec in defenses:
        d = spec.build(model)
        runs += 1 if d.differentiable and not d.randomized else 2
    return runs


def compare_defenses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    defenses: Sequence[DefenseSpec],
    attacks: Sequence[str] = ("pgd",),
    eps: Sequence[float] = (0.1,),
    norm: str = "linf",
    steps: int | None = None,
    seed: int = 0,
    eot_samples: int = 30,
    progress: Callable[[], None] | None = None,
    examples: dict | None = None,
) -> pd.DataFrame:
    """One row per (defense, eps): clean, naive and adaptive robust accuracy, the adaptive
    attack used, and the masking checks that fired on each (comma-separated names from
    `attacks.masking.CHECKS`). The first defense is the undefended model ("none").
    `progress()` is called after every attack stage (`len(stage list) * len(eps)` per
    `n_evaluations` run). `examples` (a dict) gets the undefended model's worst-case inputs
    per eps, as `attacks.evaluate` gives them (for `detection_rates`)."""
    check_adaptive(False, eot_samples)
    stages(list(attacks), steps)  # unknown attack names fail before any work
    rows = []
    base, base_fired = _evaluate(model, x, y, attacks, eps, norm, steps, seed, progress,
                                 examples=examples)
    for r in base.itertuples():
        rows.append({"defense": UNDEFENDED, "eps": r.eps, "norm": norm,
                     "clean_accuracy": r.clean_accuracy, "naive_robust_accuracy":
                     r.robust_accuracy, "adaptive_robust_accuracy": r.robust_accuracy,
                     "adaptive_attack": "gradient", "naive_warnings": ",".join(base_fired),
                     "adaptive_warnings": ",".join(base_fired)})
    for spec in defenses:
        defended = spec.build(model, seed)
        bpda, eot, label = adaptive_options(defended, eot_samples)
        naive, naive_fired = _evaluate(defended, x, y, attacks, eps, norm, steps, seed,
                                       progress)
        if label == "gradient":
            adaptive, adaptive_fired = naive, naive_fired
        else:
            adaptive, adaptive_fired = _evaluate(defended, x, y, attacks, eps, norm, steps,
                                                 seed, progress, bpda, eot)
        for n_row, a_row in zip(naive.itertuples(), adaptive.itertuples(), strict=True):
            rows.append({"defense": spec.label, "eps": n_row.eps, "norm": norm,
                         "clean_accuracy": n_row.clean_accuracy,
                         "naive_robust_accuracy": n_row.robust_accuracy,
                         "adaptive_robust_accuracy": a_row.robust_accuracy,
                         "adaptive_attack": label, "naive_warnings": ",".join(naive_fired),
                         "adaptive_warnings": ",".join(adaptive_fired)})
    return pd.DataFrame(rows)


def squeezers_of(defenses: Sequence[DefenseSpec]) -> list:
    """The deterministic transforms (bit depth, median) named anywhere in `defenses`, once
    each: the joint squeezers of Xu et al.'s detector."""
    seen, out = set(), []
    for spec in defenses:
        for part, t in zip(spec.parts, spec.transforms(), strict=True):
            if not t.randomized and part not in seen:
                seen.add(part)
                out.append(t)
    return out


def detection_rates(
    model: nn.Module,
    squeezers: list,
    x_calibration: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    adversarial: dict[float, torch.Tensor],
    fpr: float = 0.05,
) -> pd.DataFrame:
    """The squeeze detector fitted on `x_calibration` at `fpr`; per eps of `adversarial`
    ({eps: x_adv of the undefended model, e.g. `evaluate`'s `examples`}): its false-positive
    rate on the calibration data and on the clean test inputs `x`, and its detection rate on
    the successful adversarial examples (clean-correct, misclassified at x_adv)."""
    det = SqueezeDetector(model, squeezers).fit(x_calibration, fpr)
    fpr_cal = det.detect(x_calibration).float().mean().item()
    fpr_test = det.detect(x).float().mean().item() if len(x) else float("nan")
    correct = predict_logits(model, x).argmax(1) == y
    rows = []
    for e, x_adv in adversarial.items():
        success = correct & (predict_logits(model, x_adv).argmax(1) != y)
        n = int(success.sum())
        rate = det.detect(x_adv[success]).float().mean().item() if n else float("nan")
        rows.append({"eps": e, "squeezers": ",".join(repr(s) for s in squeezers),
                     "target_fpr": fpr, "threshold": det.threshold,
                     "fpr_calibration": fpr_cal, "fpr_test": fpr_test,
                     "n_adversarial": n, "detection_rate": rate})
    return pd.DataFrame(rows)
