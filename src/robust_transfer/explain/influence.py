"""Influence functions for fine-tuned models (Koh & Liang 2017, arXiv 1703.04730).

Which training images made a fine-tuned model predict what it predicts on a test image?
Utrera et al. (arXiv 2007.05869, Figs. 5-6) answer it with influence functions over the
last layer: a robust source's most influential training images look like, and share the
class of, the test image more often than a natural source's.

The objective
-------------
Fine-tuning trains only theta = the head plus the last k blocks (the rest is frozen), with
SGD and weight decay `wd` (5e-4 in `train.TrainConfig`). Its objective is

    R(theta) = (1/n) sum_i L(z_i, theta) + (wd/2) ||theta||^2,

so this module's Hessian is H = (1/n) sum_i Hess L(z_i) + (wd + damping) I. The weight
decay term is the training objective's own L2 term (it makes the head problem strictly
convex); `damping` is extra Tikhonov damping on top, for non-convex parameter sets (last
blocks) or to help LiSSA converge. BatchNorm runs in eval mode (running statistics are
constants); frozen-layer activations are computed once and cached. The frozen prefix
and the trainable suffix are the model's own `model.split(k)`.

Sign and scale convention (every score this module returns)
-----------------------------------------------------------
    influence[j, i] = g(test_j)^T H^{-1} g(train_i) / n
                    ~ L(test_j; theta_{-i}) - L(test_j; theta)

the predicted *change in test loss when training image i is removed* (its term dropped
from the sum, the 1/n normalisation and the L2 term kept) and the model retrained to the
optimum. Positive = helpful (removing it would raise the test loss), negative = harmful.
In Koh & Liang's notation this is -I_up,loss(z_i, z_test) / n. `validate_leave_one_out`
checks the sign and the scale against actual retraining on a convex model.

Solvers
-------
One abstract method, `inverse_hvp(v) ~ H^{-1} v` (the seam torch-influence uses), with
three implementations: `ExactInfluence` (the damped Hessian materialised and
Cholesky-factored: the paper's choice, for up to a few thousand parameters),
`CGInfluence` (conjugate gradient on Hessian-vector products, batched over right-hand
sides) and `LiSSAInfluence` (Agarwal et al. 2017 stochastic series, as used by Koh &
Liang). Per-example gradients use `torch.func.vmap(grad(...))`; Hessian-vector products
use forward-over-reverse (`jvp` of `grad`) with no `create_graph` anywhere.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from robust_transfer.data import ImageSet
from robust_transfer.errors import UserError, check_choice
from robust_transfer.models.nets import ConvNet
from robust_transfer.models.runtime import eval_mode

METHODS = ("exact", "cg", "lissa")
RANKINGS = ("helpful", "harmful", "abs")
MAX_EXACT_PARAMS = 6000


def _check_blocks(model: ConvNet, unfrozen_blocks: int) -> None:
    """Influence parameters are the head + an int 0..B of last blocks (B covers them all)."""
    n = len(model.block_names)
    valid = isinstance(unfrozen_blocks, int) and not isinstance(unfrozen_blocks, bool)
    if not (valid and 0 <= unfrozen_blocks <= n):
        raise UserError(f"influence blocks must be 0..{n} (0 = head only), got {unfrozen_blocks!r}")


class InfluenceModule(ABC):
    """Influence of training images on test losses over a fine-tuned parameter set.

    Args:
        model: the fine-tuned model (not modified).
        train: the images it was fine-tuned on (`ImageSet`, inputs in [0,1]).
        unfrozen_blocks: parameters = head + this many last blocks (0: head only).
        weight_decay: the L2 coefficient of the training objective (fine-tuning used 5e-4).
        damping: extra lambda added to the Hessian's diagonal (0 for the convex head).
        dtype: float64 by default, so the solvers agree to many digits.
        batch_size: examples per vectorised chunk (bounds memory).
    """

    def __init__(
        self,
        model: ConvNet,
        train: ImageSet,
        unfrozen_blocks: int = 0,
        weight_decay: float = 5e-4,
        damping: float = 0.0,
        dtype: torch.dtype = torch.float64,
        batch_size: int = 512,
    ) -> None:
        if weight_decay < 0 or damping < 0:
            raise UserError(f"weight decay and damping must be >= 0, got {weight_decay}, {damping}")
        if weight_decay + damping == 0:
            warnings.warn("no weight decay and no damping: the Hessian may be singular",
                          stacklevel=2)
        if len(train) == 0:
            raise UserError("influence needs at least one training image")
        self.model, self.unfrozen_blocks = model, unfrozen_blocks
        self.weight_decay, self.damping = float(weight_decay), float(damping)
        self.dtype, self.batch_size = dtype, int(batch_size)
        self.device = next(model.parameters()).device
        _check_blocks(model, unfrozen_blocks)
        self._prefix, suffix = model.split(unfrozen_blocks)  # the model's own seam
        self.suffix = copy.deepcopy(suffix).to(dtype).eval().requires_grad_(False)
        named = list(self.suffix.named_parameters())
        self.param_names = [name for name, _ in named]
        self.param_shapes = [p.shape for _, p in named]
        self.theta = torch.cat([p.detach().flatten() for _, p in named])
        self.buffers = {k: v for k, v in self.suffix.named_buffers()}
        self.train = train
        self.n = len(train)
        self.train_y = train.y.to(self.device)
        self.train_activations = self.activations(train.x)
        self._train_grads: torch.Tensor | None = None

    def set_parameters(self, theta: torch.Tensor) -> None:
        """Evaluate influence at another point `theta` (flat, e.g. a retrained optimum);
        clears every cached quantity that depends on it."""
        if theta.shape != self.theta.shape:
            raise ValueError(f"theta must have shape {tuple(self.theta.shape)}")
        self.theta = theta.detach().to(self.dtype).clone()
        self._train_grads = None
        self._reset_solver()

    def _reset_solver(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Drop solver caches (factorisations) after the parameters change."""

    # -- the model as a function of the flat parameter vector -------------------------------

    @property
    def num_params(self) -> int:
        return self.theta.numel()

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [math.prod(s) for s in self.param_shapes]
        parts = torch.split(theta, sizes)
        pairs = zip(self.param_names, parts, self.param_shapes, strict=True)
        return {n: t.view(s) for n, t, s in pairs}

    def logits(self, theta: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return functional_call(self.suffix, {**self._params(theta), **self.buffers},
                               (activations,))

    def _example_loss(self, theta: torch.Tensor, a: torch.Tensor, y: torch.Tensor):
        return F.cross_entropy(self.logits(theta, a.unsqueeze(0)), y.unsqueeze(0))

    @torch.no_grad()
    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen-prefix outputs for images `x` (cached for the training set)."""
        dtype = next(self.model.parameters()).dtype
        with eval_mode(self.model):
            out = [self._prefix(x[i : i + self.batch_size].to(self.device, dtype))
                   for i in range(0, len(x), self.batch_size)]
        return torch.cat(out).to(self.dtype)

    def losses(self, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor | None = None):
        """Per-example cross-entropy of images `x` at `theta` (default: the model's)."""
        theta = self.theta if theta is None else theta
        with torch.no_grad():
            logits = self.logits(theta, self.activations(x))
        return F.cross_entropy(logits, y.to(self.device), reduction="none")

    def objective(self, theta: torch.Tensor, weights: torch.Tensor | None = None):
        """R(theta) = (1/n) sum_i w_i L(z_i) + (wd/2)||theta||^2 (w = 1: the training objective;
        w_i = 0 drops example i, keeping 1/n — the leave-one-out objective)."""
        total = theta.new_zeros(())
        for i in range(0, self.n, self.batch_size):
            a = self.train_activations[i : i + self.batch_size]
            ce = F.cross_entropy(self.logits(theta, a), self.train_y[i : i + self.batch_size],
                                 reduction="none")
            if weights is not None:
                ce = ce * weights[i : i + self.batch_size]
            total = total + ce.sum()
        return total / self.n + 0.5 * self.weight_decay * theta.pow(2).sum()

    # -- gradients and Hessian-vector products ------------------------------------------------

    def per_example_gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, p) gradients of each example's loss, vectorised with vmap(grad)."""
        return self._gradients(self.activations(x), y.to(self.device))

    def _gradients(self, activations: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_example = vmap(grad(self._example_loss), in_dims=(None, 0, 0),
                           chunk_size=self.batch_size)
        return per_example(self.theta, activations, y)

    @property
    def train_gradients(self) -> torch.Tensor:
        """(n, p) per-example training-loss gradients (cached)."""
        if self._train_grads is None:
            self._train_grads = self._gradients(self.train_activations, self.train_y)
        return self._train_grads

    def _vector_chunk(self, examples: int) -> int:
        # Right-hand sides per vmap chunk: each carries a tangent through every example's
        # activations, so keep vectors x examples x activation size near 2**25 numbers.
        per_vector = max(1, examples * self.train_activations[0].numel())
        return max(1, min(1024, 2**25 // per_vector))

    def hvp(self, v: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """(H + damping I) v for each row of `v` (m, p); `index` restricts the loss part of
        H to those training examples (a minibatch estimate, used by LiSSA)."""
        if index is None:
            def loss_part(theta):
                return self.objective(theta) - 0.5 * self.weight_decay * theta.pow(2).sum()
        else:
            a, y = self.train_activations[index], self.train_y[index]

            def loss_part(theta):
                return F.cross_entropy(self.logits(theta, a), y)

        def one(u):
            return jvp(grad(loss_part), (self.theta,), (u,))[1]

        v = v.to(self.dtype)
        chunk = self._vector_chunk(self.n if index is None else len(index))
        with warnings.catch_warnings():
            # torch's first forward-mode call scripts its jvp decompositions (a deprecation
            # warning from inside torch, nothing the caller can act on).
            warnings.filterwarnings("ignore", ".*torch.jit.script.*", DeprecationWarning)
            hv = vmap(one, chunk_size=chunk)(v)
        return hv + (self.weight_decay + self.damping) * v

    def eigenvalue_range(self, iterations: int = 50, seed: int = 0) -> tuple[float, float]:
        """(smallest, largest) eigenvalue of H + damping I by power iteration (the smallest
        from the shifted operator largest*I - H). A negative smallest one means the damping
        is too small for CG (non-convex parameter sets); LiSSA's scale must exceed the
        largest."""
        largest = self._power_iteration(lambda u: self.hvp(u), iterations, seed)
        shifted = self._power_iteration(lambda u: largest * u - self.hvp(u), iterations, seed)
        return largest - shifted, largest

    def _power_iteration(self, operator, iterations: int, seed: int) -> float:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        u = torch.randn(1, self.num_params, generator=gen, dtype=self.dtype).to(self.device)
        value = 0.0
        for _ in range(iterations):
            u = u / u.norm()
            au = operator(u)
            value = float((u * au).sum())
            u = au
        return value

    # -- the seam -----------------------------------------------------------------------------

    @abstractmethod
    def inverse_hvp(self, v: torch.Tensor) -> torch.Tensor:
        """(H + damping I)^{-1} v for each row of `v` (m, p)."""

    # -- influence ---------------------------------------------------------------------------

    def influences(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(m, n) scores g(test_j)^T H^{-1} g(train_i) / n for test images `x`, labels `y`:
        the predicted change of test loss j when training image i is removed (see module
        docstring). H^{-1} is applied to whichever side has fewer vectors."""
        g_test = self.per_example_gradients(x, y)
        g_train = self.train_gradients
        if len(g_test) <= len(g_train):
            scores = self.inverse_hvp(g_test) @ g_train.T
        else:
            scores = g_test @ self.inverse_hvp(g_train).T
        return scores / self.n


class ExactInfluence(InfluenceModule):
    """Materialise H + damping I (p x p, from Hessian-vector products on the identity),
    Cholesky-factor it once; fall back to the pseudo-inverse (Utrera et al.'s choice) with a
    warning when it is not positive definite. For up to `MAX_EXACT_PARAMS` parameters."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.num_params > MAX_EXACT_PARAMS:
            raise UserError(
                f"exact influence handles at most {MAX_EXACT_PARAMS} parameters, this set has "
                f"{self.num_params}; use method 'cg' or 'lissa'"
            )
        self._factor: torch.Tensor | None = None
        self._pinv: torch.Tensor | None = None

    def hessian(self) -> torch.Tensor:
        """H + damping I, symmetrised."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        h = self.hvp(eye)
        return 0.5 * (h + h.T)

    def _reset_solver(self) -> None:
        self._factor, self._pinv = None, None

    def _prepare(self) -> None:
        if self._factor is not None or self._pinv is not None:
            return
        h = self.hessian()
        factor, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            self._factor = factor
        else:
            warnings.warn("Hessian is not positive definite: using its pseudo-inverse; consider "
                          "more damping", stacklevel=3)
            self._pinv = torch.linalg.pinv(h, hermitian=True)

    def inverse_hvp(self, v: torch.Tensor) -> torch.Tensor:
        self._prepare()
        v = v.to(self.dtype)
        if self._factor is not None:
            return torch.cholesky_solve(v.T, self._factor).T
        return v @ self._pinv


class CGInfluence(InfluenceModule):
    """Conjugate gradient on (H + damping I) x = v, all right-hand sides at once (each column
    keeps its own step sizes); stops when every residual is below `tol` times its ||v||.
    Needs H + damping I positive definite (add damping for non-convex parameter sets)."""

    def __init__(self, *args, tol: float = 1e-10, max_iter: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tol = float(tol)
        self.max_iter = int(max_iter) if max_iter is not None else max(100, 2 * self.num_params)
        self.iterations = 0

    def inverse_hvp(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.dtype)
        x = torch.zeros_like(v)
        r = v.clone()
        d = r.clone()
        rs = (r * r).sum(1)
        target = (self.tol * v.norm(dim=1)) ** 2
        for it in range(1, self.max_iter + 1):
            active = rs > target
            if not active.any():
                break
            hd = self.hvp(d)
            curvature = (d * hd).sum(1)
            if (curvature[active] <= 0).any():
                smallest, _ = self.eigenvalue_range()
                need = self.damping - smallest
                raise UserError(
                    f"CG met non-positive curvature: H + damping has an eigenvalue near "
                    f"{smallest:.3g} over these parameters (not convex); use a damping well "
                    f"above {need:.2g} (e.g. {1.5 * need:.2g})")
            alpha = torch.where(active, rs / curvature.clamp_min(1e-300), 0.0)
            x += alpha[:, None] * d
            r -= alpha[:, None] * hd
            rs_new = (r * r).sum(1)
            beta = torch.where(active, rs_new / rs.clamp_min(1e-300), 0.0)
            d = r + beta[:, None] * d
            rs = rs_new
            self.iterations = it
        else:
            warnings.warn(f"CG did not converge in {self.max_iter} iterations", stacklevel=2)
        return x


class LiSSAInfluence(InfluenceModule):
    """LiSSA (Agarwal et al. 2017, arXiv 1602.03943; Koh & Liang 2017 sec. 3):
    h_0 = v,  h_t = v + (1 - d) h_{t-1} - H_t h_{t-1} / s,  estimate = h_T / s, averaged over
    `repeats`, with H_t a minibatch Hessian (plus the L2 and damping terms). Its fixed point is
    (H + s d I)^{-1} v: the series' own damping `lissa_damping` = d adds s*d to the operator,
    so leave it 0 to solve the same system as `ExactInfluence`. It converges only when
    s > largest eigenvalue of H; `scale=None` sets s = 1.2 x a power-iteration estimate.
    Convergence is geometric with rate 1 - lambda_min / s, so it needs damping in practice.
    """

    def __init__(self, *args, depth: int = 1000, repeats: int = 1, scale: float | None = None,
                 lissa_damping: float = 0.0, lissa_batch_size: int | None = None,
                 seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if depth < 1 or repeats < 1 or (scale is not None and scale <= 0):
            raise UserError(f"LiSSA needs depth, repeats >= 1 and scale > 0, got {depth}, "
                            f"{repeats}, {scale}")
        self.depth, self.repeats, self.lissa_damping = int(depth), int(repeats), lissa_damping
        self.lissa_batch_size, self.seed = lissa_batch_size, seed
        self._auto_scale = scale is None
        self.scale = float(scale) if scale is not None else self._estimate_scale()

    def _estimate_scale(self) -> float:
        return 1.2 * self._power_iteration(self.hvp, 50, self.seed)

    def _reset_solver(self) -> None:
        # An estimated scale belongs to the Hessian at the old parameters.
        if self._auto_scale:
            self.scale = self._estimate_scale()

    def inverse_hvp(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.dtype)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        estimate = torch.zeros_like(v)
        for _ in range(self.repeats):
            h = v.clone()
            for _ in range(self.depth):
                index = None
                if self.lissa_batch_size is not None and self.lissa_batch_size < self.n:
                    index = torch.randperm(self.n, generator=gen)[: self.lissa_batch_size]
                    index = index.to(self.device)
                h = v + (1 - self.lissa_damping) * h - self.hvp(h, index) / self.scale
                if not torch.isfinite(h).all():
                    raise UserError(f"LiSSA diverged with scale {self.scale}: use a larger scale")
            estimate += h / self.scale
        return estimate / self.repeats


SOLVERS: dict[str, type[InfluenceModule]] = {
    "exact": ExactInfluence, "cg": CGInfluence, "lissa": LiSSAInfluence,
}


def make_influence(method: str, model: ConvNet, train: ImageSet, **kwargs) -> InfluenceModule:
    """The influence module for `method` ('exact' | 'cg' | 'lissa'); kwargs go to it."""
    check_choice("influence method", method, SOLVERS)
    return SOLVERS[method](model, train, **kwargs)


# -- ranking and class agreement (Utrera et al. Figs. 5-6) ---------------------------------


def rank_training_images(
    scores: torch.Tensor, k: int, ranking: str = "helpful", exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """(m, k) indices of the top-k training images for each row (test point) of `scores`.

    `ranking`: 'helpful' (largest score: removing it raises the test loss most), 'harmful'
    (most negative) or 'abs' (largest |score|). `exclude` (m,) names one training index per
    row to leave out — the target itself when the test points are training images (its
    self-influence is always top). Ties break by lower index.
    """
    check_choice("ranking", ranking, RANKINGS)
    key = {"helpful": scores, "harmful": -scores, "abs": scores.abs()}[ranking].clone()
    if exclude is not None:
        key[torch.arange(len(key), device=key.device), exclude.to(key.device)] = -math.inf
    k = min(k, key.shape[1] - int(exclude is not None))
    return torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]


def class_match_fractions(
    scores: torch.Tensor, train_y: torch.Tensor, target_y: torch.Tensor, k_max: int = 100,
    ranking: str = "helpful", exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """(m, K) fraction of the top-k training images whose class is the target's label, for
    k = 1..K, K = min(k_max, training images available) (Utrera et al. Fig. 6)."""
    top = rank_training_images(scores, k_max, ranking, exclude)
    match = (train_y.to(top.device)[top] == target_y.to(top.device)[:, None]).double()
    ks = torch.arange(1, top.shape[1] + 1, dtype=torch.float64, device=top.device)
    return match.cumsum(1) / ks
