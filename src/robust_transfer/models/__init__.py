"""Architectures with named ordered blocks, normalisation inside, and checkpoints."""

from robust_transfer.models.checkpoint import load_checkpoint, save_checkpoint
from robust_transfer.models.nets import (
    ARCHS,
    Arch,
    BlockNet,
    ConvNet,
    ModelSpec,
    build_model,
    num_blocks,
)

__all__ = ["ARCHS", "Arch", "BlockNet", "ConvNet", "ModelSpec", "build_model", "load_checkpoint",
           "num_blocks", "save_checkpoint"]
