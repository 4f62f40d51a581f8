"""Source data split by class subsets for many source models trained at once, and the target task they transfer to
(thesis 001 ch. 8, Algorithm 1: models trained on random subsets of the source classes, then transferred).

``ClassSubsetsDataModule(base=<source>, target=<target>, num_subsets=64, subset_size=5)`` draws the subsets
(``subset_masks``, (M, K) bool) from ``seed``, or takes them from ``subsets`` (lists of class indices: the removal
experiment's sources). Its train items stack one example per model, each from that model's own classes
(:class:`ClassSubsetsDataset`), so that every source model trains on its subset only — batch-norm statistics
included — while the loader, its shuffling and the DDP sampler stay those of one dataset. Validation is the source's
val split (each model scored on its own classes); test is the target's test split, and ``target_train_dataset`` is
what the linear probes are fitted on.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from lit_robust.datamodules.base import ImageDataModule
from lit_robust.datamodules.wrapper import WrappedDataModule
from lit_robust.datasets import stack_dataset
from lit_robust.functional.transfer_influence import classes_never_varied, random_class_subsets


def subset_masks(subsets: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """(len(subsets), num_classes) bool from lists of class indices; an empty subset or a class outside
    0..num_classes − 1 is refused, naming it."""
    bad = [c for subset in subsets for c in subset if not 0 <= c < num_classes]
    if bad or any(len(subset) == 0 for subset in subsets):
        raise ValueError(f"data.subsets={[list(s) for s in subsets]}: give each subset at least one class index "
                         f"in 0..{num_classes - 1}" + (f" ({bad} are not)" if bad else ""))
    masks = torch.zeros(len(subsets), num_classes, dtype=torch.bool)
    for row, subset in zip(masks, subsets):
        row[list(subset)] = True
    return masks


class ClassSubsetsDataset(Dataset):
    """Item j: ``(images (M, C, H, W), labels (M,))``, model m's j-th example among the images of its classes (in a
    fixed random order; models with fewer examples than the longest wrap round). A shuffled loader thus shows each
    model each of its examples once per epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, included: torch.Tensor,
                 generator: torch.Generator):
        members = [torch.nonzero(row[labels]).flatten() for row in included]
        empty = [m for m, found in enumerate(members) if len(found) == 0]
        if empty:
            raise ValueError(f"subsets {empty} hold no training images (classes "
                             f"{[torch.nonzero(included[m]).flatten().tolist() for m in empty]}): give every subset "
                             "a class the source has")
        length = max(len(found) for found in members)
        self.order = torch.stack([found[torch.randperm(len(found), generator=generator)][
            torch.arange(length) % len(found)] for found in members])
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.order.shape[1]

    def __getitem__(self, index: int):
        picked = self.order[:, index]
        return self.images[picked], self.labels[picked]


class ClassSubsetsDataModule(WrappedDataModule):
    """The source DataModule ``base`` by class subsets, and the ``target`` DataModule to transfer to; ``base`` and
    ``target`` are never edited. ``subsets`` (explicit class lists) override the random draw; ``num_subsets`` must
    then equal their number, so that the model's ``num_models`` (``${data.num_subsets}``) matches."""

    def __init__(self, base: ImageDataModule, target: ImageDataModule, num_subsets: int = 64, subset_size: int = 5,
                 subsets: Sequence[Sequence[int]] | None = None, seed: int | None = None):
        super().__init__(base, seed)
        if not isinstance(target, ImageDataModule):
            raise TypeError(f"target must be an ImageDataModule (e.g. data.target._target_: "
                            f"lit_robust.datamodules.DigitsDataModule); got {type(target).__name__}")
        self.target, self.target_num_classes = target, target.num_classes
        self.subset_masks = self._masks(num_subsets, subset_size, subsets)
        self.target_train_dataset: Dataset | None = None

    def _masks(self, num_subsets: int, subset_size: int, subsets: Sequence[Sequence[int]] | None) -> torch.Tensor:
        classes = self.num_classes
        if subsets is None:
            masks = random_class_subsets(num_subsets, classes, subset_size,
                                         torch.Generator().manual_seed(int(self.seed)))
            fixed = classes_never_varied(masks)
            if fixed:
                raise ValueError(f"data.num_subsets={num_subsets} random subsets leave classes {fixed} in all or none "
                                 "of them, so their influence is undefined: raise data.num_subsets or change seed")
            return masks
        if len(subsets) != num_subsets:
            raise ValueError(f"data.subsets lists {len(subsets)} subsets but data.num_subsets={num_subsets}: set "
                             f"data.num_subsets={len(subsets)}")
        return subset_masks(subsets, classes)

    @property
    def source_dataset(self) -> str:
        return f"{self.base.source_dataset}→{self.target.source_dataset}"

    def prepare_data(self) -> None:
        self.base.prepare_data()
        self.target.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.base.setup(stage)
        self.target.setup(stage)
        images, labels = stack_dataset(self.base.train_dataset)
        self.train_dataset = ClassSubsetsDataset(images, labels, self.subset_masks,
                                                 torch.Generator().manual_seed(int(self.seed) + 1))
        self.val_dataset = self.base.val_dataset
        self.test_dataset = self.target.test_dataset
        self.target_train_dataset = self.target.train_dataset
