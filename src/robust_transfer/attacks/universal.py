"""Universal adversarial perturbations (Moosavi-Dezfooli et al. 2017, arXiv 1610.08401)."""

from __future__ import annotations

import torch
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.minimal import DeepFool
from robust_transfer.attacks.threats import make_threat
from robust_transfer.errors import UserError
from robust_transfer.models.runtime import predict_logits


def as_images(data) -> torch.Tensor:
    """Images from an `ImageSet`, an (x, y) pair, a tensor, or an iterable of batches."""
    if isinstance(data, torch.Tensor):
        return data
    if hasattr(data, "x") and isinstance(data.x, torch.Tensor):
        return data.x
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) \
            and data[0].ndim == 4:
        return data[0]
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
    if not batches:
        raise UserError("no images to fit the universal perturbation on")
    return torch.cat(batches)


class UniversalPerturbation(Attack):
    """One image-agnostic perturbation v with ||v||_p <= eps that fools most inputs.

    `fit(data)` runs the paper's Algorithm 1: pass over the data in a random order; for each
    x that x + v does not fool yet (same prediction as x), add DeepFool's minimal L2
    perturbation of x + v (overshoot 0.02; L2 for either norm, as the paper's arg min
    ||r||_2 and its code) and project v back onto the eps-ball of `norm`; stop when
    the fooling rate on the fitting data reaches `target_fooling` (= 1 - delta; 0.8 in the
    paper) or after `max_passes`. DeepFool runs batched over `batch_size` images at the
    current v, whose updates are then added in order (batch_size=1 is the paper's loop).
    `atk(x)` returns clip(x + v); `fooling_rate(x)` is the fraction whose prediction changes.
    The eps-ball projection of v is the threat model's (`ThreatModel.project_delta`).

    Shape: fit on (N, C, H, W) images in [0,1]; v is (1, C, H, W); atk(x) -> x's shape.

    Example:
        atk = UniversalPerturbation(model, eps=2.0, norm="l2").fit(train_images)
        x_adv = atk(x)
    """

    norms = ("l2", "linf")

    def __init__(
        self,
        model: nn.Module,
        eps: float = 2.0,
        norm: str = "l2",
        target_fooling: float = 0.8,
        max_passes: int = 10,
        deepfool_steps: int = 10,
        overshoot: float = 0.02,
        batch_size: int = 16,
        seed: int | None = 0,
    ) -> None:
        super().__init__(model, seed)
        type(self).check_norm(norm)
        self.threat = make_threat(norm, eps)  # rejects negative and non-finite eps
        if not 0 < target_fooling <= 1 or max_passes < 1 or batch_size < 1:
            raise UserError(f"bad universal perturbation settings: "
                            f"target_fooling={target_fooling} (allowed: (0, 1]), "
                            f"max_passes={max_passes}, batch_size={batch_size} (allowed: >= 1)")
        self.eps, self.norm, self.target_fooling = float(eps), norm, target_fooling
        self.max_passes, self.batch_size = max_passes, batch_size
        self.deepfool = DeepFool(model, "l2", deepfool_steps, overshoot)
        self.v: torch.Tensor | None = None
        self.history: list[float] = []

    def fit(self, data) -> UniversalPerturbation:
        x = as_images(data).to(next(self.model.parameters()).device)
        pred = predict_logits(self.model, x).argmax(1)
        v = torch.zeros_like(x[:1])
        gen = self.generator(torch.device("cpu"))
        self.history = []
        best_v, best_rate = v, -1.0
        for _ in range(self.max_passes):
            order = torch.randperm(len(x), generator=gen).to(x.device)
            for batch in order.split(self.batch_size):
                xb = (x[batch] + v).clamp(0, 1)
                keep = predict_logits(self.model, xb).argmax(1) == pred[batch]
                if not keep.any():
                    continue
                x_df = self.deepfool(xb[keep], pred[batch][keep])
                for dr in (x_df - xb[keep]).split(1):  # cheap: add and project, in order
                    v = self.threat.project_delta(v + dr)
            self.v = v
            self.history.append(self.fooling_rate(x))
            if self.history[-1] > best_rate:
                best_v, best_rate = v, self.history[-1]
            if best_rate >= self.target_fooling:
                break
        # The rate oscillates from pass to pass when eps is large against the images; keep
        # the best perturbation seen on the fitting data (the paper stops at the first
        # success, which is the same thing when it is reached).
        self.v = best_v
        return self

    def perturb(self, x, y=None, target=None):
        if self.v is None:
            raise UserError("UniversalPerturbation: call fit(data) before attacking")
        return (x + self.v.to(x.device)).clamp(0, 1)

    def __call__(self, x, y=None, target=None):
        return super().__call__(x, torch.zeros(len(x), dtype=torch.long, device=x.device))

    def fooling_rate(self, data) -> float:
        """Fraction of images whose predicted label changes under the perturbation."""
        x = as_images(data).to(next(self.model.parameters()).device)
        clean = predict_logits(self.model, x).argmax(1)
        fooled = predict_logits(self.model, self.perturb(x)).argmax(1) != clean
        return fooled.float().mean().item()
