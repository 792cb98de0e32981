"""Architectures with named ordered blocks, normalisation inside, and checkpoints."""

from robust_transfer.models.checkpoint import load_checkpoint, save_checkpoint
from robust_transfer.models.nets import ARCHS, ConvNet, ModelSpec, build_model

__all__ = ["ARCHS", "ConvNet", "ModelSpec", "build_model", "load_checkpoint", "save_checkpoint"]
