"""Square Attack (Andriushchenko et al. 2020, arXiv 1912.00049): score-based black-box random
search, Linf and L2.

It only queries the model's scores. At each iteration it proposes a change on square windows
of side s (set by the schedule p(i) = p_init / 2^k, k growing at iterations 10, 50, 200,
500, 1000, 2000, 4000, 6000, 8000 of a 10,000-query run, rescaled to `n_queries`) and keeps
it for the examples whose margin loss it lowers; an example stops once it is fooled.

- Linf (Alg. 2): start from vertical stripes of +-eps; a proposal fills one window with a
  random +-eps per channel. Signs that would leave x_best unchanged are redrawn, as in the
  reference code.
- L2 (Alg. 3 and the reference `square.py`): start from a grid of s x s blocks (s = h // 5),
  each holding the centre-heavy pattern `eta(s)` with a random sign per channel, scaled to
  ||delta||_2 = eps. A proposal moves the mass of a second window W2 into a first window W1:
  W1 gets a fresh random-signed `eta(s)` plus its old content (per channel normalised),
  rescaled so that it carries W1's and W2's old mass plus whatever eps budget is unused; W2
  is zeroed; the whole delta is then rescaled to norm eps and the image clipped to [0,1].
  The window side is odd and at least 3.

Windows (`windows=`):
- "example" (the constructor's default; Andriushchenko et al.'s code): every example draws its
  own windows and signs, and redraws signs that would leave it unchanged;
- "batch" (`build`, hence `evaluate` and the `autoattack` cascades; AutoAttack's
  `square.py`): one window per iteration (L2: one pair, one orientation) for the whole batch
  and, Linf, one sign per channel; no redraws. The shared draws are keyed by (seed,
  iteration) alone, so they are the same whatever the batch.
Per-example draws come from `ExampleRNG` with counter (iteration, draw) (vectorised with
masks, no loop over examples), so either way an example's result does not depend on the
batch or on which other examples are still being attacked. AutoAttack's defaults:
p_init = 0.8, 5,000 queries, margin loss.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.losses import margin
from robust_transfer.attacks.rng import ExampleRNG
from robust_transfer.attacks.rows import Rows
from robust_transfer.attacks.threats import make_threat
from robust_transfer.errors import UserError, check_choice

_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
             (6000, 128), (8000, 256), (10000, 512))
_RESAMPLE = 20  # redraws of a window's signs that would leave x_best unchanged
# counters of the per-example draws: (iteration, what[, redraw])
_PLACES, _SIGNS, _FLIP = range(3)
_INIT = -1  # iteration counter of the initialisation
_BLOCK = 64  # iterations whose draws are made in one pass
WINDOWS = ("example", "batch")  # whose windows: each example's, or one for the batch
_SHARED_CORNERS = 5  # L2 "batch": two corners and the orientation, shared


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of pixels the square covers at iteration `it` (the published schedule)."""
    it = int(it / n_queries * 10000)
    if it <= 10:
        return p_init
    for bound, div in _SCHEDULE[1:]:
        if it <= bound:
            return p_init / div
    return p_init


def eta_rectangle(a: int, b: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(a, b) centre-heavy block: sum over nested rectangles (side 2r + 1 around the centre)
    of 1 / (r + 1)^2, unit L2 norm (the reference's `eta_rectangles`)."""
    out = torch.zeros(a, b, device=device, dtype=dtype)
    ca, cb = a // 2, b // 2
    for r in range(max(ca + 1, cb + 1)):  # a handful of rectangles per window side: cheap
        rows = slice(max(ca - r, 0), min(ca + r + 1, a))
        out[rows, max(cb - r, 0):min(cb + r + 1, b)] += 1 / (r + 1) ** 2
    return out / out.norm().clamp_min(1e-12)


def eta(s: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(s, s) L2 window pattern: a centre-heavy block on the top half, its negative on the
    bottom half, unit L2 norm (the "meta pseudo-Gaussian" of Andriushchenko et al.)."""
    out = torch.zeros(s, s, device=device, dtype=dtype)
    out[:s // 2] = eta_rectangle(s // 2, s, device, dtype)
    out[s // 2:] = -eta_rectangle(s - s // 2, s, device, dtype)
    return out / out.norm().clamp_min(1e-12)


@lru_cache(maxsize=64)
def _eta_cached(s: int) -> torch.Tensor:
    """eta(s) in float64 on the CPU, made once per window side (s changes a few times)."""
    return eta(s, dtype=torch.float64)


def _window_mask(top: torch.Tensor, left: torch.Tensor, s: int, h: int, w: int):
    """(rows from top, cols from left, mask): each (N, 1, h, w); mask marks each example's
    s x s window with corner (top, left)."""
    r = torch.arange(h, device=top.device).view(1, 1, h, 1) - top.view(-1, 1, 1, 1)
    c = torch.arange(w, device=top.device).view(1, 1, 1, w) - left.view(-1, 1, 1, 1)
    return r, c, (r >= 0) & (r < s) & (c >= 0) & (c < s)


def _place(pattern: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
           h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, mask), each (N, 1, h, w): the (s, s) `pattern` (transposed where `flip`) put
    at each example's window (top, left), zero elsewhere."""
    s = pattern.shape[0]
    r, c, mask = _window_mask(top, left, s, h, w)
    r, c = r.clamp(0, s - 1), c.clamp(0, s - 1)
    values = torch.where(flip.view(-1, 1, 1, 1), pattern[c, r], pattern[r, c])
    return torch.where(mask, values, torch.zeros_like(values)), mask


class Square(Attack):
    """Square Attack, Linf or L2 (Andriushchenko et al. 2020, arXiv 1912.00049). No gradients.

    Loss: the margin z_y - max_{i!=y} z_i (untargeted; minimised) or max_{i!=t} z_i - z_t
    (targeted, `atk(x, y, target=t)`). Stops per example once the margin is negative; an
    example already fooled at x is returned unchanged without a query (reference code).
    `n_queries` counts model queries per example, the initial one included. `windows`:
    "example" (Andriushchenko et al.'s code) or "batch" (AutoAttack's `square.py`, what
    `build` makes); see the module docstring.

    Shape: x (N, C, H, W) in [0,1], y (N,) -> (N, C, H, W).

    Example:
        x_adv = Square(model, eps=8 / 255, n_queries=5000)(x, y)
        x_adv = Square(model, eps=0.5, norm="l2", windows="batch")(x, y)
    """

    name = "square"
    norms = ("linf", "l2")
    black_box = True
    default_steps = 5000

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        norm: str = "linf",
        n_queries: int = 5000,
        p_init: float = 0.8,
        seed: int | None = 0,
        windows: str = "example",
    ) -> None:
        super().__init__(model, seed)
        type(self).check_norm(norm)
        if n_queries < 1 or not 0 < p_init <= 1:
            raise UserError(f"need n_queries >= 1 and 0 < p_init <= 1, got {n_queries}, {p_init}")
        check_choice("square windows", windows, WINDOWS)
        self.threat = make_threat(norm, eps)
        self.norm, self.eps, self.n_queries, self.p_init = norm, float(eps), n_queries, p_init
        self.windows = windows

    @classmethod
    def build(
        cls, model: nn.Module, eps: float, norm: str, steps: int | None = None, seed: int = 0
    ) -> Square:
        """AutoAttack's Square (`windows="batch"`); `steps` is the query budget (None:
        5,000, AutoAttack's)."""
        return cls(model, eps, norm, cls.default_steps if steps is None else steps, seed=seed,
                   windows="batch")

    @torch.no_grad()
    def _margin(self, x, y, target):
        # margin() is "larger = more adversarial"; Square minimises its negation.
        return -margin(self.model(x), y, target)

    @torch.no_grad()
    def perturb(self, x, y, target):
        if x.ndim != 4:
            raise UserError(f"Square needs images (N, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[2:]
        if min(h, w) < 2:
            raise UserError(f"Square needs images of at least 2 x 2 pixels, got {h} x {w}")
        out = x.clone()
        # fooled already at x: returned as is, no query (the reference codes attack only
        # the examples the model gets right)
        todo = (self._margin(x, y, target) > 0).nonzero().squeeze(1)
        x, y, target = x[todo], y[todo], None if target is None else target[todo]
        rng = ExampleRNG.for_inputs(x, self.seed)
        if self.norm == "linf":
            x_best = self.threat.project(x + self.eps * rng.sign((x.shape[1], 1, w), _INIT,
                                                                  dtype=x.dtype), x)
            ends = self._ends(x)
        else:
            ends = None
            x_best = self._init_l2(x, rng)
        # the examples still attacked, kept compact (attacks/rows.py): one leaves once fooled,
        # its x_best final, instead of gathering the unfooled ones for every query
        r = Rows(idx=todo, x=x, y=y, target=target,
                 keys=rng.keys, x_best=x_best, loss_best=self._margin(x_best, y, target), u=None,
                 ends=ends, rows=None, cols=None, plus=None)
        n_draws = self._n_draws(x.shape[1])
        shared = ExampleRNG.shared(self.seed, x.device) if self.windows == "batch" else None
        for it in range(self.n_queries):
            active = r.loss_best > 0
            if not active.all():  # fooled (or a NaN loss): the example's x_best is final
                done = ~active
                out[r.idx[done]] = r.x_best[done]
                r.keep(active)
            if len(r.idx) == 0 or it == self.n_queries - 1:
                break
            j = it % _BLOCK
            if j == 0:  # the next iterations' draws, in one pass (rows leave too)
                its = range(it, min(it + _BLOCK, self.n_queries - 1))
                counters = [(i, _PLACES) for i in its]
                if ends is not None:  # Linf: the block's windows and signs, in one pass
                    source = ExampleRNG(r.keys) if shared is None else shared
                    block = self._linf_block(source.bits_many((n_draws,), counters), its, h, w)
                    # a shared block (one row) stands for every example's
                    r.rows, r.cols, r.plus = (t.expand(len(r.idx), *t.shape[1:])
                                              for t in block)
                else:
                    bits = ExampleRNG(r.keys).bits_many((n_draws,), counters)
                    r.u = ExampleRNG.to_uniform(bits, torch.float64)
                    if shared is not None:  # L2, one pair of windows and orientation
                        r.u[:, :, :_SHARED_CORNERS] = ExampleRNG.to_uniform(
                            shared.bits_many((_SHARED_CORNERS,), counters), torch.float64)
            if ends is not None:
                window = self._block_window(r.rows[:, j], r.cols[:, j])
                if shared is None:
                    x_new = self._fill_linf(r.x, r.x_best, window, r.plus[:, j], r.ends)
                else:  # AutoAttack's: the window at x +- eps, x_best elsewhere, no redraws
                    plus = r.plus[:, j, 0].view(*r.plus.shape[:1], -1, 1, 1)
                    x_new = torch.where(window, torch.where(plus, r.ends[:, 0], r.ends[:, 1]),
                                        r.x_best)
            else:
                x_new = self._propose_l2(r.x, r.x_best, r.u[:, j],
                                         p_selection(self.p_init, it, self.n_queries))
            loss = self._margin(x_new, r.y, r.target)
            better = loss < r.loss_best
            r.x_best = torch.where(better.view(-1, 1, 1, 1), x_new, r.x_best)
            r.loss_best = torch.where(better, loss, r.loss_best)
        out[r.idx] = r.x_best
        return out

    @staticmethod
    def _corners(u: torch.Tensor, s: int, h: int, w: int):
        """Window corners from two uniforms per example: top in [0, h - s), left in
        [0, w - s) (the reference's range), each (N, 1, 1, 1)."""
        top = (u[:, 0] * max(h - s, 1)).floor().long().view(-1, 1, 1, 1)
        left = (u[:, 1] * max(w - s, 1)).floor().long().view(-1, 1, 1, 1)
        return top, left

    def _n_draws(self, c: int) -> int:
        """Uniform draws per iteration of each example's stream (of the shared one, Linf
        with `windows="batch"`): Linf the window corner and the signs of the first try and
        of every redraw (shared: no redraws); L2 two corners, the orientation, a sign per
        channel (shared: the first five come from the shared stream)."""
        if self.norm == "l2":
            return 5 + c
        return 2 + (1 if self.windows == "batch" else _RESAMPLE + 1) * c

    def _ends(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2, C, H, W): x + eps and x - eps, projected: what a Linf window holds (per
        example, fixed)."""
        return torch.stack([self.threat.project(x + sign * self.eps, x) for sign in (1.0, -1.0)],
                           1)

    @staticmethod
    def _side_linf(p: float, h: int, w: int) -> int:
        """Linf window side for the fraction p of the pixels: at least 1, below min(h, w)."""
        return min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w) - 1)

    def _linf_block(self, bits: torch.Tensor, its: range, h: int, w: int):
        """(window rows (N, B, h), window columns (N, B, w), signs (N, B, tries, C)) of the
        B iterations `its` from their random bits (N, B, n_draws) (`ExampleRNG.bits_many`):
        the per-iteration `_corners`, `_window_mask` and sign tests of `_propose_linf` for the
        whole block in one pass (a sign u >= 0.5 is a negative int64, see `bits_many`). An
        iteration's window is `_block_window(rows[:, j], cols[:, j])`; rows and columns, not
        (N, B, h, w) masks, keep the block small on large images."""
        m, b = bits.shape[:2]
        sides = [self._side_linf(p_selection(self.p_init, it, self.n_queries), h, w)
                 for it in its]
        u = ExampleRNG.to_uniform(bits[:, :, :2], torch.float64)  # the corners' numbers
        span = torch.tensor([[max(h - s, 1), max(w - s, 1)] for s in sides], dtype=u.dtype,
                            device=u.device)
        top, left = (u * span).floor().long().unbind(2)  # (m, b) each
        side = torch.tensor(sides, device=u.device).view(1, b, 1)
        r = torch.arange(h, device=u.device).view(1, 1, h) - top.unsqueeze(2)
        c = torch.arange(w, device=u.device).view(1, 1, w) - left.unsqueeze(2)
        rows, cols = (r >= 0) & (r < side), (c >= 0) & (c < side)  # (m, b, h), (m, b, w)
        tries = 1 if self.windows == "batch" else _RESAMPLE + 1
        return rows, cols, (bits[:, :, 2:] < 0).view(m, b, tries, -1)

    @staticmethod
    def _block_window(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """(N, 1, h, w) window mask from its rows (N, h) and columns (N, w)."""
        return (rows.unsqueeze(2) & cols.unsqueeze(1)).unsqueeze(1)

    def _propose_linf(self, x, x_best, u, p, ends=None):
        """x_best with one window set to +-eps per channel (Alg. 2), projected. As the
        reference code, signs that would leave x_best unchanged are redrawn (it would waste a
        query), at most `_RESAMPLE` times (eps = 0 never changes anything). `u`: the
        iteration's draws; `ends`: `_ends(x)` if the caller keeps it."""
        m, c, h, w = x.shape
        s = self._side_linf(p, h, w)
        window = _window_mask(*self._corners(u, s, h, w), s, h, w)[2]
        plus = (u[:, 2:] >= 0.5).view(m, _RESAMPLE + 1, c)  # each try's sign per channel
        return self._fill_linf(x, x_best, window, plus, self._ends(x) if ends is None else ends)

    def _fill_linf(self, x, x_best, window, plus, ends):
        """`_propose_linf` from each example's window (N, 1, h, w) and each try's signs
        (N, tries, C)."""
        m, c = x.shape[:2]
        # the projection is per coordinate, so every try's proposal takes, channel by
        # channel, one of two fills: the window at x + eps or at x - eps, projected
        # (P(where(window, a, b)) = where(window, P(a), P(b)) coordinate by coordinate)
        kept = self.threat.project(x_best, x)
        fills = [torch.where(window, ends[:, k], kept) for k in (0, 1)]
        # per channel, whether each fill moves x_best: (m, 1, c) for + and for -
        up, down = ((f - x_best).abs_().amax((2, 3)).unsqueeze(1) >= 1e-7 for f in fills)
        changes = (down ^ (plus & (up ^ down))).any(2)  # (m, tries): the try's signs move it
        # the first try that changes x_best (the redraws stop there), else the last one
        changes[:, -1] = True
        tries = changes.int().argmax(1)
        chosen = plus[torch.arange(m, device=x.device), tries]  # (m, c)
        return torch.where(chosen.view(m, c, 1, 1), *fills)

    def _init_l2(self, x, rng):
        """Grid of s x s blocks, s = h // 5, each eta(s) with a random sign per channel and a
        random orientation, from offset (h - 5s) // 2; only whole blocks; scaled to eps."""
        n, c, h, w = x.shape
        s = max(h // 5, 1)
        off_h, off_w = max((h - 5 * s) // 2, 0), max((w - 5 * s) // 2, 0)
        nb_h, nb_w = (h - off_h) // s, (w - off_w) // s  # whole blocks only
        rows = torch.arange(h, device=x.device).view(h, 1) - off_h
        cols = torch.arange(w, device=x.device).view(1, w) - off_w
        bi, bj = rows.div(s, rounding_mode="floor"), cols.div(s, rounding_mode="floor")
        inside = (rows >= 0) & (bi < nb_h) & (cols >= 0) & (bj < nb_w)
        bi, bj = bi.clamp(0, nb_h - 1), bj.clamp(0, nb_w - 1)
        lr, lc = rows % s, cols % s  # position inside the block
        pattern = _eta_cached(s).to(x.device, x.dtype)
        flip = rng.uniform((nb_h, nb_w), _INIT, _FLIP) < 0.5  # (n, nb_h, nb_w)
        flip = flip[:, bi, bj]  # (n, h, w)
        values = torch.where(flip, pattern[lc, lr], pattern[lr, lc])
        signs = rng.sign((c, nb_h, nb_w), _INIT, _SIGNS, dtype=x.dtype)[:, :, bi, bj]
        delta = torch.where(inside, values.unsqueeze(1) * signs, torch.zeros_like(signs))
        return (x + self.threat.to_surface(delta)).clamp(0, 1)

    def _propose_l2(self, x, x_best, u, p):
        """Move W2's mass into W1 with a fresh eta(s) (Alg. 3), keep ||delta||_2 = eps."""
        m, c, h, w = x.shape
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s = min(s + 1 - s % 2, min(h, w) - 1)  # odd, as the reference; fits the image
        delta = x_best - x
        pattern = _eta_cached(s).to(x.device, x.dtype)
        fresh, in1 = _place(pattern, *self._corners(u[:, 0:2], s, h, w), u[:, 4] < 0.5, h, w)
        in2 = _window_mask(*self._corners(u[:, 2:4], s, h, w), s, h, w)[2]
        signs = torch.where(u[:, 5:] < 0.5, -1.0, 1.0).to(x.dtype).view(m, c, 1, 1)
        fresh = fresh * signs  # (m, c, h, w)

        def norm(t, dims):
            return t.pow(2).sum(dims, keepdim=True).sqrt()

        old1 = torch.where(in1, delta, torch.zeros_like(delta))
        spare = (self.eps ** 2 - norm(delta, (1, 2, 3)) ** 2).clamp_min(0)  # unused budget
        mass = norm(torch.where(in1 | in2, delta, torch.zeros_like(delta)), (1, 2, 3))
        new1 = fresh + old1 / (norm(old1, (2, 3)) + 1e-12)
        new1 = new1 / (norm(new1, (2, 3)) + 1e-12) * (spare / c + mass ** 2).sqrt()
        delta = torch.where(in1, new1, torch.where(in2, torch.zeros_like(delta), delta))
        return (x + self.threat.to_surface(delta)).clamp(0, 1)
