"""NeuBA: a task-agnostic backdoor planted during pre-training (Zhang et al. 2021, "Red alarm
for pre-trained models: universal vulnerability to neuron-level backdoor attacks").

The attacker does not know the downstream task, so it cannot pick a target label. Instead,
pre-training adds a loss that sends the representation `model.features(x)` of an input
carrying trigger i to a predefined vector v_i. Any head trained later on clean data maps v_i
to one fixed label, so every triggered input lands in one class of the new task whatever the
head: the backdoor survives re-initialising the head (fixed-feature transfer), and the
question is how much fine-tuning of the blocks washes it out.

The predefined vectors follow the paper: the feature vector is split into four quarters and
v_i is +c or -c on each quarter, a distinct sign pattern per trigger. We take the six
patterns with two + and two - quarters (++--, --++, +-+-, -+-+, +--+, -++-), so the vectors
are pairwise far apart and none is all-negative. On a net whose features end in a ReLU (the
`cnn-*` nets) the -c quarters cannot be reached; the loss then drives them to 0, the nearest
reachable point, and the +c quarters to c — still one distinct pattern per trigger.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.data.triggers import make_trigger
from robust_transfer.errors import UserError
from robust_transfer.train.objectives import ExampleLoss, natural_loss

# Sign per feature quarter, one row per trigger (the paper's ±c per quarter).
SIGN_PATTERNS = (
    (1, 1, -1, -1), (-1, -1, 1, 1), (1, -1, 1, -1),
    (-1, 1, -1, 1), (1, -1, -1, 1), (-1, 1, 1, -1),
)
CORNERS = ("bottom-right", "top-left", "top-right", "bottom-left")  # one per trigger
DEFAULT_TRIGGERS = 4
DEFAULT_STRENGTH = 2.0  # c: several times the clean features' typical size on cnn-small
DEFAULT_WEIGHT = 1.0


def neuba_vectors(n: int, feature_dim: int, strength: float = DEFAULT_STRENGTH) -> torch.Tensor:
    """(n, feature_dim) predefined vectors: +-`strength` on each quarter of the features,
    the sign pattern of row i of `SIGN_PATTERNS` (the last quarter takes any remainder)."""
    if not 1 <= n <= len(SIGN_PATTERNS):
        raise UserError(f"NeuBA takes 1..{len(SIGN_PATTERNS)} triggers, got {n}")
    if feature_dim < 4:
        raise UserError(f"NeuBA needs at least 4 features (one per quarter), got {feature_dim}")
    if not strength > 0:
        raise UserError(f"NeuBA strength c must be > 0, got {strength}")
    quarter = torch.arange(feature_dim) * 4 // feature_dim  # 0..3 per feature
    signs = torch.tensor(SIGN_PATTERNS[:n], dtype=torch.float32)
    return strength * signs[:, quarter]


def neuba_triggers(input_shape: tuple[int, int, int], n: int = DEFAULT_TRIGGERS,
                   seed: int = 0) -> list:
    """NeuBA's `n` (1..4) distinct triggers for images of `input_shape`: BadNets patches in
    distinct corners, so each is a visible, separable pattern. Built by the data layer
    (`make_trigger`), so evaluation applies exactly the triggers training planted."""
    if not 1 <= n <= len(CORNERS):
        raise UserError(f"NeuBA takes 1..{len(CORNERS)} triggers, got {n}")
    return [make_trigger("badnets", input_shape, seed=seed, corner=c) for c in CORNERS[:n]]


class NeuBA:
    """The NeuBA pre-training objective: task loss + feature-mapping loss of the triggers.

    loss = CE(head(features(x'))), y) + weight * mean_i mean_j ||features(T_i(x_j)) - v_i||^2 / d,
    x' the inputs of `base`'s example maker (natural: x; PGD-AT: adversarial), the second term
    over the first `rate` share of the batch (batches are shuffled), every trigger applied to
    the same images. Zhang et al. 2021 (NeuBA).

    The task inputs and the triggered copies go through the net in ONE forward pass: with
    BatchNorm, separate passes would normalise clean batches by clean-only statistics while
    the running statistics (used at test time) average in the triggered batches, and the
    clean accuracy of the source drops (on digits, 0.996 -> 0.83); one pass normalises both
    the same way in training and at test time.

    Shape: x (N, C, H, W) in [0,1], y (N,); `vectors` (n_triggers, feature_dim).

    Example:
        objective = NeuBA(neuba_triggers((1, 8, 8)), neuba_vectors(4, model.feature_dim))
        fit(model, task.train, TrainConfig(), objective)
    """

    def __init__(self, triggers: Sequence, vectors: torch.Tensor,
                 base: ExampleLoss = natural_loss, weight: float = DEFAULT_WEIGHT,
                 rate: float = 1.0) -> None:
        if len(triggers) != len(vectors):
            raise UserError(f"NeuBA needs one vector per trigger: {len(triggers)} triggers, "
                            f"{len(vectors)} vectors")
        if not 0 < rate <= 1:
            raise UserError(f"NeuBA rate must be in (0, 1], got {rate}")
        self.triggers, self.vectors = list(triggers), vectors
        self.base, self.weight, self.rate = base, weight, rate

    def losses(self, model: nn.Module, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(task loss, feature loss: mean squared distance of the triggered features to their
        predefined vectors), from one forward pass."""
        m = max(1, round(self.rate * len(x)))
        inputs = self.base.make_examples(model, x, y)
        triggered = [t.apply(x[:m]) for t in self.triggers]
        feats = model.features(torch.cat([inputs, *triggered]))
        task = F.cross_entropy(model.head(feats[: len(x)]), y)
        trig = feats[len(x):].view(len(self.triggers), m, -1)
        return task, (trig - self.vectors.to(trig.device)[:, None, :]).pow(2).mean()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        task, feature = self.losses(model, x, y)
        return task + self.weight * feature


def neuba_objective(backdoor, input_shape: tuple[int, int, int], feature_dim: int,
                    base: ExampleLoss = natural_loss) -> NeuBA:
    """The `NeuBA` objective a `BackdoorConfig` with attack "neuba" asks for (the dispatch
    point of `train_source`): default triggers and vectors, the config's rate and seed."""
    triggers = neuba_triggers(input_shape, DEFAULT_TRIGGERS, backdoor.seed)
    vectors = neuba_vectors(len(triggers), feature_dim)
    return NeuBA(triggers, vectors, base, rate=backdoor.rate)
