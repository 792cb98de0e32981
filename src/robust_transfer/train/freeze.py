"""Freezing for the transfer protocol: frozen means no gradient AND BatchNorm in eval mode.

Which blocks are frozen is read off `requires_grad`, never stored twice.
"""

from __future__ import annotations

from torch import nn


def freeze_all_but_last(model: nn.Module, k: int | None) -> None:
    """Train only the head and the last `k` blocks (`k=0`: head only; None: everything).

    The cut is the model's own `split(k)` (which validates `k`): its prefix is frozen.
    """
    prefix, _ = model.split(k)
    model.requires_grad_(True)
    prefix.requires_grad_(False)


def frozen_blocks(model: nn.Module) -> list[nn.Module]:
    """Blocks whose parameters all have `requires_grad=False`."""
    return [b for b in model.blocks if not any(p.requires_grad for p in b.parameters())]


def set_train_mode(model: nn.Module) -> None:
    """`model.train()`, except frozen blocks, which stay in eval mode (BN stats untouched),
    and any other module whose own parameters are all frozen (e.g. PreActResNet's final BN,
    which runs after the blocks)."""
    model.train()
    for block in frozen_blocks(model):
        block.eval()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            module.eval()
