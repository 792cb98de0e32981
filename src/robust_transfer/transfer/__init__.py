"""The transfer protocol, experiment specs, grid expansion, executors and the results store."""

from robust_transfer.transfer.finetune import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "finetune"]
