"""Validate influence functions against leave-one-out retraining on a convex model.

Koh & Liang (2017, arXiv 1703.04730, Fig. 2) check their approximation on L2-regularised
logistic regression: remove one training point, retrain to convergence, compare the actual
change in a test point's loss with the predicted one. Here the convex model is the
classifier head on frozen features (multinomial logistic regression with L2 coefficient
`weight_decay`), trained and retrained with L-BFGS in float64 so optimisation error is far
below the effects being measured. The influence scores come from the same
`ExactInfluence` code the explanations use, so this validates that code, sign and 1/n
scale included: predicted = g_test^T H^{-1} g_i / n = change of test loss on removing i.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from robust_transfer.data import load_task, shots_per_class
from robust_transfer.errors import UserError
from robust_transfer.explain.influence import ExactInfluence, InfluenceModule
from robust_transfer.models.nets import ConvNet
from robust_transfer.models.runtime import torch_threads


@dataclass
class LeaveOneOutResult:
    """Predicted and actual test-loss changes for each removed training image."""

    predicted: np.ndarray
    actual: np.ndarray
    removed: np.ndarray  # training-set indices, in the order of predicted/actual
    test_index: int
    test_loss: float
    num_train: int
    weight_decay: float

    @property
    def pearson(self) -> float:
        return float(np.corrcoef(self.predicted, self.actual)[0, 1])

    @property
    def sign_agreement(self) -> float:
        return float(np.mean(np.sign(self.predicted) == np.sign(self.actual)))


@contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny-tensor work on one thread: intra-op thread hand-offs cost more than they
    save on a 645-parameter problem (and far more on a busy machine)."""
    with torch_threads(1):
        yield


def minimise(module: InfluenceModule, theta0: torch.Tensor, weights: torch.Tensor | None = None,
             grad_tol: float = 1e-9, max_rounds: int = 20) -> torch.Tensor:
    """argmin of `module.objective(theta, weights)` by L-BFGS (strong Wolfe line search) from
    `theta0` (a warm start); stops when the gradient norm is below `grad_tol` (float64: the
    optimum is then exact to ~grad_tol / weight_decay) or L-BFGS makes no more progress."""
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, history_size=50,
                            tolerance_grad=grad_tol, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = module.objective(theta, weights)
        loss.backward()
        return loss

    previous = math.inf
    for _ in range(max_rounds):
        loss = float(opt.step(closure).detach())
        if theta.grad.norm() <= grad_tol or loss >= previous:
            break
        previous = loss
    return theta.detach()


def leave_one_out_changes(module: InfluenceModule, x: torch.Tensor, y: torch.Tensor,
                          removed: torch.Tensor) -> np.ndarray:
    """Actual change of the test loss of (x, y) (one image) when each training image in
    `removed` is dropped and the model retrained from the current optimum (warm start)."""
    a, y = module.activations(x), y.to(module.device)

    def test_loss(theta: torch.Tensor) -> float:
        with torch.no_grad():
            return F.cross_entropy(module.logits(theta, a), y, reduction="sum").item()

    base = test_loss(module.theta)
    changes = []
    with single_thread():
        for i in removed.tolist():  # one full retraining per removed image, not a hot path
            weights = torch.ones(module.n, dtype=module.dtype, device=module.device)
            weights[i] = 0.0
            changes.append(test_loss(minimise(module, module.theta, weights)) - base)
    return np.asarray(changes)


def validate_leave_one_out(
    feature_model: ConvNet | None = None,
    task: str = "digits-5to9",
    images_per_class: int = 20,
    num_removed: int = 40,
    weight_decay: float = 0.01,
    test_index: int | None = None,
    seed: int = 0,
    source_epochs: int = 3,
) -> LeaveOneOutResult:
    """Predicted vs actual leave-one-out test-loss changes of a convex model.

    The features come from `feature_model` (default: a natural source trained for
    `source_epochs` epochs on digits 0-4), frozen. A fresh head is fit on `images_per_class`
    images per class of `task` to the exact optimum. The test image is `test_index`
    (default: the highest-loss test image, where effects are largest). The `num_removed`
    training images with the largest |predicted change| are each removed and the head
    retrained to convergence.
    """
    if num_removed < 2:
        raise UserError(f"remove at least 2 training images, got {num_removed}")
    data = load_task(task)
    if feature_model is None:
        from robust_transfer.train import SourceConfig, TrainConfig, train_source

        source_task = "digits-0to4" if data.input_shape[0] == 1 else task
        feature_model, _ = train_source(SourceConfig(
            task=source_task, train=TrainConfig(epochs=source_epochs, seed=seed)))
    model = copy.deepcopy(feature_model).eval()
    model.reset_head(data.num_classes, torch.Generator().manual_seed(seed))
    train = data.train.subset(shots_per_class(data.train.y, images_per_class, seed))
    if num_removed > len(train):
        raise UserError(f"cannot remove {num_removed} of {len(train)} training images")
    module = ExactInfluence(model, train, weight_decay=weight_decay)
    with single_thread():
        module.set_parameters(minimise(module, torch.zeros_like(module.theta)))

    if test_index is None:
        test_index = int(module.losses(data.test.x, data.test.y).argmax())
    if not 0 <= test_index < len(data.test):
        raise UserError(f"test index must be 0..{len(data.test) - 1}, got {test_index}")
    x = data.test.x[test_index : test_index + 1]
    y = data.test.y[test_index : test_index + 1]
    scores = module.influences(x, y)[0]
    removed = scores.abs().argsort(descending=True)[:num_removed]
    actual = leave_one_out_changes(module, x, y, removed)
    return LeaveOneOutResult(
        predicted=scores[removed].cpu().numpy(), actual=actual, removed=removed.cpu().numpy(),
        test_index=test_index, test_loss=module.losses(x, y).item(), num_train=len(train),
        weight_decay=weight_decay,
    )
