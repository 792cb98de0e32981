"""Architectures with named ordered blocks, normalisation inside, and checkpoints."""

from robust_transfer.models.card import SourceCard, card_from_meta, read_card
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

__all__ = ["ARCHS", "Arch", "BlockNet", "ConvNet", "ModelSpec", "SourceCard", "build_model",
           "card_from_meta", "load_checkpoint", "num_blocks", "read_card", "save_checkpoint"]
