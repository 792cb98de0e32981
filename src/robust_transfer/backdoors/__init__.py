"""Backdoors: metrics (C-Acc, ASR, RA), backdoored source training, and backdoor defenses."""

from robust_transfer.backdoors.metrics import backdoor_metrics

__all__ = ["backdoor_metrics"]
