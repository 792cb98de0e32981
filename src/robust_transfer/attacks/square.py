"""Square Attack (Andriushchenko et al. 2020, arXiv 1912.00049): score-based black-box, Linf.

Random search that only queries the model's scores: start from vertical stripes of +-eps,
then at each iteration propose a new square window of side s (set by the schedule
p(i) = p_init / 2^k, k growing at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
of a 10,000-query run, rescaled to `n_queries`) filled with a random +-eps per channel, and
keep it for the examples whose margin loss it lowers. Each still-robust example draws its
own window (vectorised with masks, no loop over examples); signs that would leave its
x_best unchanged are redrawn, as in the reference code. AutoAttack's defaults:
p_init = 0.8, 5,000 queries, margin loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.losses import margin
from robust_transfer.attacks.threats import make_threat
from robust_transfer.errors import UserError, check_choice

_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
             (6000, 128), (8000, 256), (10000, 512))
_RESAMPLE = 20  # redraws of a window's signs that would leave x_best unchanged


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of pixels the square covers at iteration `it` (the published schedule)."""
    it = int(it / n_queries * 10000)
    if it <= 10:
        return p_init
    for bound, div in _SCHEDULE[1:]:
        if it <= bound:
            return p_init / div
    return p_init


class Square(Attack):
    """Square Attack, Linf (Andriushchenko et al. 2020, arXiv 1912.00049). No gradients.

    Loss: the margin z_y - max_{i!=y} z_i (untargeted; minimised) or max_{i!=t} z_i - z_t
    (targeted, `atk(x, y, target=t)`). Stops per example once the margin is negative.
    """

    black_box = True

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        norm: str = "linf",
        n_queries: int = 5000,
        p_init: float = 0.8,
        seed: int | None = 0,
    ) -> None:
        super().__init__(model, seed)
        check_choice("Square norm", norm, {"linf"})
        if n_queries < 1 or not 0 < p_init <= 1:
            raise UserError(f"need n_queries >= 1 and 0 < p_init <= 1, got {n_queries}, {p_init}")
        self.threat = make_threat(norm, eps)
        self.norm, self.eps, self.n_queries, self.p_init = norm, float(eps), n_queries, p_init

    @torch.no_grad()
    def _margin(self, x, y, target):
        # margin() is "larger = more adversarial"; Square minimises its negation.
        return -margin(self.model(x), y, target)

    @torch.no_grad()
    def perturb(self, x, y, target):
        gen = self.generator(x.device)
        n, c, h, w = x.shape
        eps = self.eps

        def rand_sign(*shape):
            r = torch.randint(0, 2, shape, generator=gen, device=x.device)
            return (2 * r - 1).to(x.dtype)

        # init: vertical stripes of +-eps (one sign per column and channel)
        x_best = (x + eps * rand_sign(n, c, 1, w)).clamp(0, 1)
        loss_best = self._margin(x_best, y, target)
        rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
        for it in range(self.n_queries - 1):
            idx = (loss_best > 0).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            m = len(idx)
            x_cur, x_best_cur = x[idx], x_best[idx]
            p = p_selection(self.p_init, it, self.n_queries)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1)
            top = torch.randint(0, h - s, (m, 1, 1, 1), generator=gen, device=x.device)
            left = torch.randint(0, w - s, (m, 1, 1, 1), generator=gen, device=x.device)
            window = (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
            signs = rand_sign(m, c, 1, 1)
            for _ in range(_RESAMPLE):
                delta = torch.where(window, eps * signs, x_best_cur - x_cur)
                x_new = (x_cur + delta.clamp(-eps, eps)).clamp(0, 1)
                # as the reference code: redraw a window that would not change x_best (it
                # would waste a query); bounded, as eps = 0 never changes anything
                same = (x_new - x_best_cur).abs().flatten(1).amax(1) < 1e-7
                if not same.any():
                    break
                signs = torch.where(same.view(-1, 1, 1, 1), rand_sign(m, c, 1, 1), signs)
            tgt = None if target is None else target[idx]
            loss = self._margin(x_new, y[idx], tgt)
            better = loss < loss_best[idx]
            x_best[idx[better]] = x_new[better]
            loss_best[idx[better]] = loss[better]
        return x_best
