"""Naive vs adaptive robust accuracy of input defenses, and the squeeze detector's rates.

The published story (Athalye et al. 2018, arXiv 1802.00420): input-transformation defenses
look robust when attacked naively, because their gradients are shattered (bit-depth
reduction) or stochastic (random resize and pad); BPDA and EOT bring robust accuracy back
down to about the undefended model's. `evaluate_defense` measures both for one defense
through the one evaluation path (`attacks.evaluate`), records which gradient-masking checks
fired on each, and picks the adaptive attack from what the defense declares (the `defend`
study, `studies.defend`, runs it per defense):

- a non-differentiable transform -> BPDA; a randomized one -> EOT (n draws); both -> both;
- a differentiable deterministic defense (median smoothing) -> its true gradient, which
  already is the adaptive attack: the naive numbers are reused.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

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


def _evaluate(model, x, y, attacks, eps, norm, steps, seed, bpda=False,
              eot_samples=1, examples=None) -> tuple[pd.DataFrame, list[str]]:
    """`attacks.evaluate`'s worst-case rows and the names of the masking checks that fired."""
    if isinstance(model, Defended):
        model.reseed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradientMaskingWarning)
        table = evaluate(model, x, y, attacks, eps, norm, steps, seed,
                         examples=examples, bpda=bpda, eot_samples=eot_samples)
    fired = []
    for w in caught:
        if isinstance(w.message, GradientMaskingWarning):
            if w.message.check not in fired:
                fired.append(w.message.check)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return table[table["attack"] == "worst case"].reset_index(drop=True), fired


def evaluate_defense(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    defense: DefenseSpec | None,
    attacks: Sequence[str] = ("pgd",),
    eps: Sequence[float] = (0.1,),
    norm: str = "linf",
    steps: int | None = None,
    seed: int = 0,
    eot_samples: int = 30,
    examples: dict | None = None,
) -> list[dict]:
    """One row per eps for `defense` on `model` (None: the undefended model, "none"): test
    accuracy, naive and adaptive robust accuracy, the adaptive attack used, and the masking
    checks that fired on each (comma-separated names from `attacks.masking.CHECKS`). The
    defense is built from `seed` and every attack is reseeded, so a defense's rows do not
    depend on which others are evaluated. `examples` (a dict; undefended model only) gets its
    worst-case inputs per eps, as `attacks.evaluate` gives them (for `detection_rates`)."""
    check_adaptive(False, eot_samples)
    stages(list(attacks), steps)  # unknown attack names fail before any work
    if defense is None:
        base, fired = _evaluate(model, x, y, attacks, eps, norm, steps, seed,
                                examples=examples)
        return [_row(UNDEFENDED, norm, r, r, "gradient", fired, fired)
                for r in base.itertuples()]
    defended = defense.build(model, seed)
    bpda, eot, label = adaptive_options(defended, eot_samples)
    naive, naive_fired = _evaluate(defended, x, y, attacks, eps, norm, steps, seed)
    if label == "gradient":
        adaptive, adaptive_fired = naive, naive_fired
    else:
        adaptive, adaptive_fired = _evaluate(defended, x, y, attacks, eps, norm, steps, seed,
                                             bpda, eot)
    return [_row(defense.label, norm, n_row, a_row, label, naive_fired, adaptive_fired)
            for n_row, a_row in zip(naive.itertuples(), adaptive.itertuples(), strict=True)]


def _row(defense: str, norm: str, naive, adaptive, label: str, naive_fired: list[str],
         adaptive_fired: list[str]) -> dict:
    return {"defense": defense, "eps": naive.eps, "norm": norm,
            "test_accuracy": naive.clean_accuracy,
            "naive_robust_accuracy": naive.robust_accuracy,
            "adaptive_robust_accuracy": adaptive.robust_accuracy, "adaptive_attack": label,
            "naive_warnings": ",".join(naive_fired),
            "adaptive_warnings": ",".join(adaptive_fired)}


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
