"""Certified robustness by randomized smoothing (Cohen, Rosenfeld & Kolter 2019).

    smooth = Smooth(model, num_classes=10, sigma=0.25)
    pred = smooth.predict(x, n=100_000, alpha=0.001)            # ABSTAIN (-1) where unsure
    cert = smooth.certify(x, n0=100, n=100_000, alpha=0.001)    # .prediction, .radius
    certified_accuracy(cert.radius, cert.prediction == y, [0, 0.25, 0.5])
    empirical_robust_accuracy(smooth, x, y, [0.25, 0.5])       # the attack's upper bound
    result = certify_dataset(model, x, y, [0.25, 0.5], num_classes=10, n=10_000)  # tables
"""

from robust_transfer.certify.empirical import SmoothedSoft, empirical_robust_accuracy
from robust_transfer.certify.evaluate import CertifyResult, EmpiricalAttack, certify_dataset
from robust_transfer.certify.metrics import (
    average_certified_radius,
    certified_accuracy,
    radius_scale,
    table_radii,
)
from robust_transfer.certify.smooth import (
    ABSTAIN,
    Certificate,
    Smooth,
    check_budget,
    lower_confidence_bound,
)

__all__ = [
    "ABSTAIN",
    "Certificate",
    "CertifyResult",
    "EmpiricalAttack",
    "Smooth",
    "SmoothedSoft",
    "average_certified_radius",
    "certified_accuracy",
    "certify_dataset",
    "check_budget",
    "empirical_robust_accuracy",
    "lower_confidence_bound",
    "radius_scale",
    "table_radii",
]
