"""The base of every image DataModule: splits held as datasets of [0, 1] images, loaders that are correct under DDP.

Contract used by the wrappers (poisoned, shifted) and by data-changing callbacks (purification, filtering):
``train_dataset``, ``val_dataset`` and ``test_dataset`` are plain attributes after ``setup()``; the loaders read them
each time they are built, so replacing ``train_dataset`` before the train loader exists changes the whole fit.
Every item is ``(image, target, ...)`` with the image a float tensor in [0, 1], shape (C, H, W).
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int):
    """Indices (train, val, test) of a fixed split stratified by class; the same seed gives the same split."""
    indices = np.arange(len(labels))
    rest, test = (indices, indices[:0]) if test_fraction == 0 else train_test_split(
        indices, test_size=test_fraction, stratify=labels, random_state=seed)
    val_share = val_fraction / (1.0 - test_fraction)
    train, val = (rest, rest[:0]) if val_fraction == 0 else train_test_split(
        rest, test_size=val_share, stratify=labels[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


def check_labels(labels, num_classes: int, dataset: str, fix: str) -> None:
    """Refuse class labels outside 0 … ``num_classes`` − 1 at setup, naming the first one, ``dataset`` and ``fix``:
    a loader would hand them on and training would fail at its first step with an unrelated IndexError."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ValueError(f"{dataset} has label {labels[bad[0]]} at index {bad[0]} ({len(bad)} of {len(labels)} labels "
                         f"outside 0..{num_classes - 1} for its {num_classes} classes): {fix}")


def check_trained_on(record: dict, datamodule: L.LightningDataModule) -> None:
    """Refuse ``datamodule`` when it is not the data a checkpoint was trained on (``record``: the checkpoint's
    ``lit_robust`` record, with ``source_dataset`` and ``num_classes``): its test numbers would be those of another
    task, e.g. ~10 % for a model of the 8×8 digits upsampled to 28×28 evaluated on MNIST's 28×28 digits."""
    for key in ("source_dataset", "num_classes"):
        trained, given = record.get(key), getattr(datamodule, key, None)
        if trained is not None and given is not None and trained != given:
            raise ValueError(f"the checkpoint was trained on data with {key}={trained} but the data "
                             f"({type(datamodule).__name__}) has {key}={given}: pass the experiment= and data "
                             f"settings of the training run (its config.yaml beside checkpoints/)")


class ImageDataModule(L.LightningDataModule):
    """Loaders over ``train_dataset`` / ``val_dataset`` / ``test_dataset``; subclasses fill them in ``setup``.

    Under DDP the evaluation loaders use an unpadded distributed sampler: Lightning's default pads every rank to the
    same length by repeating samples, which would count those samples twice in validation and test metrics.
    """

    num_classes: int = 10
    in_chans: int = 1

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    @property
    def source_dataset(self) -> str:
        """Which dataset the images come from, before resizing and under any wrapper (``DigitsDataModule:sklearn8x8``):
        recorded in checkpoints, so that a model is not evaluated on other data that merely has the same image shape
        (:func:`check_trained_on`). Subclasses that read several datasets append the one they were given."""
        return type(self).__name__

    @property
    def img_size(self) -> int:
        return int(self._first_image().shape[-1])

    def _first_image(self) -> torch.Tensor:
        if self.train_dataset is None:
            self.setup("fit")
        return self.train_dataset[0][0]

    def _loader(self, dataset: Dataset | None, name: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {name} split; call setup() first")
        if train and len(dataset) == 0:  # (an empty val/test loader is skipped by Lightning with a warning)
            raise ValueError(f"{type(self).__name__}'s {name} split is empty: check its setup() and data settings "
                             f"(sizes, fractions, filters) so the {name} split holds at least one sample")
        sampler = None
        trainer = self.trainer
        if not train and trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                                   rank=trainer.global_rank, shuffle=False)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"  # pinned: async host→GPU copies
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False, pin_memory=on_gpu)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

