"""The transfer protocol, experiment specs, grid expansion, executors and the results store."""

from robust_transfer.transfer.engines import finetune
from robust_transfer.transfer.finetune import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune"]
