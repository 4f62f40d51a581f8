"""``RelabelledDataModule``: any classification ``ImageDataModule`` with its classes mapped onto fewer (or other)
ones, e.g. the digits with labels mod 5: a target task whose classes are not the source's (bias transfer, Salman 2023
ch. 7), on the same images and split as the base."""
from __future__ import annotations

from typing import Sequence

import torch

from lit_robust.datamodules.base import ImageDataModule
from lit_robust.datamodules.wrapper import WrappedDataModule
from lit_robust.datasets import TensorImageDataset, stack_dataset


class RelabelledDataModule(WrappedDataModule):
    """Wrap ``base`` (never edited): class c of every split becomes ``label_map[c]``; the classes are
    0 … max(label_map) (``[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]``: the ten digits mod 5)."""

    def __init__(self, base: ImageDataModule, label_map: Sequence[int]):
        super().__init__(base)
        label_map = [int(c) for c in label_map]
        if len(label_map) != base.num_classes:
            raise ValueError(f"data.label_map has {len(label_map)} entries for the base's {base.num_classes} "
                             f"classes: give one new class per base class")
        classes = sorted(set(label_map))
        if classes != list(range(len(classes))):
            raise ValueError(f"data.label_map={label_map} uses classes {classes}: the new classes must be "
                             f"0..{len(classes) - 1}, each used at least once")
        self.label_map = torch.tensor(label_map)
        self.num_classes = len(classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.base.setup(stage)
        self.train_dataset, self.val_dataset, self.test_dataset = (
            self.relabelled(split) for split in (self.base.train_dataset, self.base.val_dataset,
                                                 self.base.test_dataset))

    def relabelled(self, split) -> TensorImageDataset:
        images, labels = stack_dataset(split)
        return TensorImageDataset(images, self.label_map[labels])
