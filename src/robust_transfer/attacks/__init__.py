"""Threat models, attacks and robustness evaluation. Inputs in [0,1], models return logits."""

from robust_transfer.attacks.base import Attack
from robust_transfer.attacks.gradient import FGSM, PGD
from robust_transfer.attacks.metrics import robust_accuracy
from robust_transfer.attacks.threats import NORMS, L2Threat, LinfThreat, ThreatModel, make_threat

__all__ = [
    "Attack",
    "FGSM",
    "PGD",
    "robust_accuracy",
    "NORMS",
    "L2Threat",
    "LinfThreat",
    "ThreatModel",
    "make_threat",
]
