"""Threat models, attacks and robustness evaluation. Inputs in [0,1], models return logits.

    atk = PGD(model, eps=0.5, norm="l2", steps=20)   # one class per attack
    x_adv = atk(x, y)                                # untargeted
    x_adv = atk(x, y, target=t)                      # targeted, where supported
    atk.set_adaptive(bpda=True, eot_samples=30)      # BPDA / EOT against input defenses
    table = evaluate(model, x, y, ["autoattack"], eps=[8 / 255])   # the one evaluation path
"""

from robust_transfer.attacks.adaptive import InputTransform, bpda_scope
from robust_transfer.attacks.apgd import APGD, APGDDLR, APGDT
from robust_transfer.attacks.base import ATTACK_MODES, Attack
from robust_transfer.attacks.evaluate import evaluate
from robust_transfer.attacks.fab import FAB, FABT
from robust_transfer.attacks.fooling import FoolingImages
from robust_transfer.attacks.gradient import BIM, FGSM, PGD
from robust_transfer.attacks.kl import KLPGD
from robust_transfer.attacks.masking import GradientMaskingWarning, check_model
from robust_transfer.attacks.minimal import CW, LBFGS, DeepFool
from robust_transfer.attacks.registry import ATTACKS, AUTOATTACK, CASCADES, make_attack
from robust_transfer.attacks.rng import ExampleRNG
from robust_transfer.attacks.square import Square
from robust_transfer.attacks.threats import (
    NORMS,
    L1Threat,
    L2Threat,
    LinfThreat,
    ThreatModel,
    make_threat,
)
from robust_transfer.attacks.transferability import as_matrix, transfer_matrix
from robust_transfer.attacks.universal import UniversalPerturbation

__all__ = [
    "ATTACK_MODES",
    "Attack",
    "InputTransform",
    "bpda_scope",
    "FGSM",
    "BIM",
    "PGD",
    "KLPGD",
    "APGD",
    "APGDDLR",
    "APGDT",
    "FAB",
    "FABT",
    "Square",
    "CW",
    "DeepFool",
    "LBFGS",
    "UniversalPerturbation",
    "FoolingImages",
    "ATTACKS",
    "AUTOATTACK",
    "CASCADES",
    "ExampleRNG",
    "make_attack",
    "evaluate",
    "transfer_matrix",
    "as_matrix",
    "GradientMaskingWarning",
    "check_model",
    "NORMS",
    "L1Threat",
    "L2Threat",
    "LinfThreat",
    "ThreatModel",
    "make_threat",
]
