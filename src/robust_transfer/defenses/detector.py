"""The feature-squeezing detector (Xu, Evans & Qi 2018, arXiv 1704.01155, Sec. 5).

score(x) = max over squeezers s of || softmax(f(x)) - softmax(f(s(x))) ||_1: a legitimate
input gives about the same prediction squeezed or not, an adversarial one often does not. An
input is flagged when its score exceeds a threshold chosen on clean data so that at most a
stated fraction of that data is flagged (the false-positive rate; 5% in the paper).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robust_transfer.attacks.adaptive import InputTransform
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import predict_logits


class SqueezeDetector:
    """Flag inputs whose prediction moves under squeezing (Xu et al. 2018).

    `fit(x_clean, fpr)` sets `threshold` so that at most `fpr` of `x_clean` scores above it
    (ties only lower the rate); `detect(x)` is score > threshold.

    Shape: x (N, C, H, W) in [0,1] -> scores (N,), flags (N,) bool.

    Example:
        det = SqueezeDetector(model, [BitDepth(4), MedianSmoothing(2)]).fit(x_val, fpr=0.05)
        rate = det.detect(x_adv).float().mean()
    """

    def __init__(self, model: nn.Module, squeezers: list[InputTransform],
                 batch_size: int = 1024) -> None:
        if not squeezers:
            raise UserError("the squeeze detector needs at least one squeezer "
                            "(squeeze-bits:B or median:K)")
        for s in squeezers:
            if not isinstance(s, InputTransform) or s.randomized:
                raise UserError(f"the squeeze detector takes deterministic input transforms, "
                                f"got {s!r}")
        self.model, self.squeezers, self.batch_size = model, list(squeezers), batch_size
        self.threshold: float | None = None
        self.fpr: float | None = None

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """max_s L1(softmax(f(x)), softmax(f(s(x)))) per example."""
        p = predict_logits(self.model, x, self.batch_size).softmax(1)
        dist = [(p - predict_logits(self.model, s(x), self.batch_size).softmax(1)).abs().sum(1)
                for s in self.squeezers]
        return torch.stack(dist).amax(0)

    def fit(self, x_clean: torch.Tensor, fpr: float = 0.05) -> SqueezeDetector:
        """Threshold = the (floor(fpr * n) + 1)-th largest clean score: at most
        floor(fpr * n) clean inputs score strictly above it."""
        if not isinstance(fpr, (int, float)) or not 0 <= fpr < 1 or math.isnan(fpr):
            raise UserError(f"false-positive rate must be in [0, 1), got {fpr!r}")
        if len(x_clean) == 0:
            raise UserError("the squeeze detector needs clean data to choose its threshold")
        scores = self.score(x_clean).sort(descending=True).values
        self.threshold = scores[math.floor(fpr * len(scores))].item()
        self.fpr = float(fpr)
        return self

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:
            raise UserError("fit the squeeze detector on clean data before detecting")
        return self.score(x) > self.threshold
