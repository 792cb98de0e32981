"""robust_transfer: what transfers from a pretrained source model to a downstream task.

Layers (DESIGN.md): data -> models -> attacks -> train -> transfer -> explain -> report -> cli.
A layer imports only from the layers before it.
"""

__version__ = "0.1.0"
