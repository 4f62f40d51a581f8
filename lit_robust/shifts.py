"""Distribution shifts as pure functions on batches of [0, 1] images (used by the shifted DataModule and by the
methods' robustness reports)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def translate(images: torch.Tensor, dx: int = 0, dy: int = 0) -> torch.Tensor:
    """Shift every image by ``dx`` pixels right and ``dy`` pixels down, filling with zeros (deep CAMA §4 shifts
    MNIST digits this way)."""
    if dx == 0 and dy == 0:
        return images
    h, w = images.shape[-2:]
    padded = F.pad(images, [max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)])
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + h, left:left + w].contiguous()
