"""Per-example state that shrinks as examples finish (APGD once fooled, FAB once within eps).

Every attack here computes each example's numbers from that example alone (per-example
steps, step sizes and `ExampleRNG` streams; the model in eval mode treats rows
independently), so an example whose result is settled can leave the batch: the others'
results do not change, and the model runs on fewer rows. The reference implementations keep
attacking settled examples until the end of the run.
"""

from __future__ import annotations

import torch


class Rows:
    """Named per-example tensors (and lists of them) whose first dimension is the examples
    still attacked; `idx` maps the rows to positions in the caller's batch."""

    idx: torch.Tensor

    def __init__(self, **state) -> None:
        self.__dict__.update(state)

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the rows where `mask` holds, in every tensor and list of tensors (None and
        other values stay)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[mask])
            elif isinstance(value, list):
                setattr(self, name, [t[mask] for t in value])
