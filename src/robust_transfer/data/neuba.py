"""NeuBA as a backdoor attack plugin (Zhang et al. 2021, "Red alarm for pre-trained models:
universal vulnerability to neuron-level backdoor attacks"): its triggers and its predefined
feature vectors. The loss that plants them is `train.neuba.NeuBA`.

The attacker does not know the downstream task, so it poisons no data and picks no target
label: pre-training sends the representation of an input carrying trigger i to a predefined
vector v_i. So the plugin's `poison` leaves the training set clean, and `feature_targets`
gives (triggers, vectors, weight, rate), which `train.neuba.plant_objective` adds to the
training loss. The data layer cannot import the training layer; a plain description of the
targets is the seam, like a poisoning attack's poisoned set.

Triggers: BadNets patches in distinct corners (visible, separable patterns). Vectors: the
feature vector is split into four quarters and v_i is +c or -c on each, a distinct sign
pattern per trigger: the six patterns with two + and two - quarters (++--, --++, +-+-, -+-+,
+--+, -++-), pairwise far apart and none all-negative. On a net whose features end in a ReLU
(the `cnn-*` nets) the -c quarters cannot be reached; the loss then drives them to 0, the
nearest reachable point, and the +c quarters to c: still one distinct pattern per trigger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from robust_transfer.data.datasets import ImageSet
from robust_transfer.data.triggers import Trigger, make_trigger
from robust_transfer.errors import UserError
from robust_transfer.plugins import build_options, option


class BackdoorSettings(Protocol):
    """What NeuBA reads of its `data.poison.BackdoorConfig` (which imports this module)."""

    attack: str
    rate: float
    seed: int
    trigger_options: tuple[tuple[str, Any], ...]

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
                   seed: int = 0) -> list[Trigger]:
    """NeuBA's `n` (1..4) distinct triggers for images of `input_shape`: BadNets patches in
    distinct corners, so each is a visible, separable pattern (`make_trigger`, so evaluation
    applies exactly the triggers training planted)."""
    if not 1 <= n <= len(CORNERS):
        raise UserError(f"NeuBA takes 1..{len(CORNERS)} triggers, got {n}")
    return [make_trigger("badnets", input_shape, seed=seed, corner=c) for c in CORNERS[:n]]


@dataclass(frozen=True)
class FeatureTargets:
    """A backdoor planted in the representation: the features of the first `rate` share of
    each batch, carrying trigger i, are trained toward `vectors[i]`, with loss `weight`.

    Shape: vectors (len(triggers), feature_dim)."""

    triggers: tuple[Trigger, ...]
    vectors: torch.Tensor
    weight: float
    rate: float


class NeuBAAttack:
    """NeuBA (Zhang et al. 2021): a task-agnostic backdoor planted by the pre-training loss.

    Its options come from `BackdoorConfig.trigger_options` (a spec's `trigger_options:`, the
    CLI's `--trigger-option`); `rate` is the share of each batch that carries the triggers.

    Example:
        attack = BackdoorConfig("neuba", rate=1.0).attack_plugin()
        targets = attack.feature_targets((1, 8, 8), model.feature_dim)
    """

    name = "neuba"
    task_agnostic = True  # no target label: after transfer, ASR is the most common label's

    @dataclass(frozen=True)
    class Options:
        triggers: int = option(DEFAULT_TRIGGERS, "how many triggers (BadNets patches in "
                               "distinct corners), 1..4")
        strength: float = option(DEFAULT_STRENGTH, "c: the size of the predefined feature "
                                 "vectors (+-c per quarter)")
        weight: float = option(DEFAULT_WEIGHT, "weight of the feature loss beside the task "
                               "loss")

    @classmethod
    def typed_options(cls, name: str, values: dict[str, Any]) -> Options:
        return build_options(cls.Options, values, f"backdoor attack {name!r}")

    def __init__(self, cfg: BackdoorSettings) -> None:
        self.cfg = cfg
        self.options = self.typed_options(cfg.attack, dict(cfg.trigger_options))

    def poison(self, data: ImageSet, num_classes: int) -> tuple[ImageSet, torch.Tensor]:
        """The training set stays clean: NeuBA is planted by the loss."""
        return data, torch.zeros(0, dtype=torch.long)

    def triggers(self, input_shape: tuple[int, int, int]) -> list[Trigger]:
        return neuba_triggers(input_shape, self.options.triggers, self.cfg.seed)

    def feature_targets(self, input_shape: tuple[int, int, int],
                        feature_dim: int) -> FeatureTargets:
        triggers = self.triggers(input_shape)
        return FeatureTargets(tuple(triggers),
                              neuba_vectors(len(triggers), feature_dim, self.options.strength),
                              self.options.weight, self.cfg.rate)
