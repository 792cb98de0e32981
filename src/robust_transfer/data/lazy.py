"""Images read from disk as they are needed, for data sets too big for one in-memory tensor.

`LazyImageFolder` is the ImageFolder layout (`root/<class>/<image>`, classes sorted by name
-> labels 0..K-1, images sorted by name), read one file at a time, so `train.fit` can feed it
through a `DataLoader` whose worker processes decode while the model trains. The eager
loaders (`data.datasets`) remain the default for everything that fits a tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from robust_transfer.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")


class LazyImageFolder(Dataset):
    """(image (C, size, size) float in [0,1], label) per file of an ImageFolder tree.

    `channels` 3 converts to RGB, 1 to grey; `size` resizes (bilinear) when given.

    Shape:
        item: ((channels, H, W) float32 in [0,1], int label).

    Example:
        >>> data = LazyImageFolder("train/", size=32)
        >>> fit(model, data, cfg, loader_workers=4)
    """

    def __init__(self, root: str | Path, size: int | None = None, channels: int = 3) -> None:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder {str(root)!r} does not exist")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files = [(f, label) for label, c in enumerate(self.classes)
                      for f in sorted((root / c).iterdir())
                      if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise UserError(f"image folder {str(root)!r} holds no images in class "
                            f"subdirectories ({', '.join(IMAGE_SUFFIXES)})")
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels}")
        self.size, self.mode = size, "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.files[index]
        with Image.open(path) as image:
            image = image.convert(self.mode)
            if self.size is not None and image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
        x = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1)
        return x.contiguous(), label
