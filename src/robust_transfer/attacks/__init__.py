"""Threat models, attacks and robustness evaluation. Inputs in [0,1], models return logits.

    atk = PGD(model, eps=0.5, norm="l2", steps=20)   # one class per attack
    x_adv = atk(x, y)                                # untargeted
    x_adv = atk(x, y, target=t)                      # targeted, where supported
"""

from robust_transfer.attacks.apgd import APGD, APGDT
from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.evaluate import ATTACKS, AUTOATTACK, evaluate, make_attack
from robust_transfer.attacks.fooling import FoolingImages
from robust_transfer.attacks.gradient import BIM, FGSM, PGD
from robust_transfer.attacks.masking import GradientMaskingWarning, check_model
from robust_transfer.attacks.metrics import robust_accuracy
from robust_transfer.attacks.minimal import CW, LBFGS, DeepFool
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
    "Attack",
    "FGSM",
    "BIM",
    "PGD",
    "APGD",
    "APGDT",
    "Square",
    "CW",
    "DeepFool",
    "LBFGS",
    "UniversalPerturbation",
    "FoolingImages",
    "ATTACKS",
    "AUTOATTACK",
    "make_attack",
    "evaluate",
    "transfer_matrix",
    "as_matrix",
    "GradientMaskingWarning",
    "check_model",
    "robust_accuracy",
    "NORMS",
    "L1Threat",
    "L2Threat",
    "LinfThreat",
    "ThreatModel",
    "make_threat",
]
