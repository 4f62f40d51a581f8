"""The common part of DataModules that wrap another one (poisoned, shifted): forward the base's loader settings,
class count and channels, delegate ``prepare_data``, and offer a DDP-safe loader for extra evaluation views."""
from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from lit_robust.datamodules.base import ImageDataModule


class WrappedDataModule(ImageDataModule):
    """Base class of wrappers; ``base`` is kept as ``self.base`` and never edited."""

    def __init__(self, base: ImageDataModule, seed: int | None = None):
        if not isinstance(base, ImageDataModule):
            raise TypeError(f"base must be an ImageDataModule (e.g. data.base._target_: "
                            f"lit_robust.datamodules.DigitsDataModule); got {type(base).__name__}")
        super().__init__(batch_size=base.batch_size, eval_batch_size=base.eval_batch_size,
                         num_workers=base.num_workers, seed=base.seed if seed is None else seed)
        self.base = base
        self.num_classes, self.in_chans = getattr(base, "num_classes", None), base.in_chans

    @property
    def source_dataset(self) -> str:
        return self.base.source_dataset

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def eval_dataloader(self, dataset: Dataset) -> DataLoader:
        """An evaluation loader over ``dataset`` (unpadded sharding under DDP)."""
        return self._loader(dataset, "evaluation", train=False)
