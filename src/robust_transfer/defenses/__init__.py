"""Inference-time defenses as `nn.Module` wrappers, and their adaptive evaluation.

    defended = Defended(model, BitDepth(4))                  # any attack accepts it
    naive = evaluate(defended, x, y, ["pgd"], eps=[0.1])      # zero gradients: looks robust
    bpda = evaluate(defended, x, y, ["pgd"], eps=[0.1], bpda=True)   # Athalye et al. 2018
    rand = Defended(model, RandomResizePad(seed=0))
    eot = evaluate(rand, x, y, ["pgd"], eps=[0.1], eot_samples=30)

The BPDA / EOT mechanism lives in the attacks layer (`attacks.adaptive`); the transforms here
subclass its `InputTransform` and say whether they are differentiable and randomized.
"""

from robust_transfer.defenses.detector import SqueezeDetector
from robust_transfer.defenses.evaluation import (
    adaptive_options,
    detection_rates,
    evaluate_defense,
    squeezers_of,
)
from robust_transfer.defenses.parse import (
    INPUT_DEFENSES,
    DefenseSpec,
    defenses_help,
    parse_defenses,
)
from robust_transfer.defenses.randomization import RandomResizePad
from robust_transfer.defenses.squeeze import BitDepth, MedianSmoothing
from robust_transfer.defenses.wrap import Defended

__all__ = [
    "BitDepth",
    "MedianSmoothing",
    "RandomResizePad",
    "Defended",
    "SqueezeDetector",
    "INPUT_DEFENSES",
    "DefenseSpec",
    "parse_defenses",
    "defenses_help",
    "adaptive_options",
    "detection_rates",
    "evaluate_defense",
    "squeezers_of",
]
