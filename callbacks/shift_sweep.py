"""Accuracy under each shift of a DataModule's sweep (``shifted_test_datasets()``: ``ShiftedDataModule``, or a
user's DataModule with that method), logged as ``shift/<name>/acc`` at test time; "accuracy falls as the shift
grows" is read off these keys. Every rank predicts its batches and logs the single-process numbers."""
from __future__ import annotations

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit_robust.callbacks.contract import ContractCallback
from lit_robust.callbacks.metric_eval import run_metric


class ShiftSweep(ContractCallback):
    """At the end of every test epoch, evaluate the model on ``trainer.datamodule.shifted_test_datasets()``.

    Args:
        prefix: the logged keys' first part; batch_size: images per forward pass.
        item_keys: the item format of the shifted sets (contract: :class:`ContractCallback`).
    """

    def __init__(self, prefix: str = "shift", batch_size: int = 256, item_keys: tuple | None = None):
        super().__init__(item_keys=item_keys)
        self.prefix, self.batch_size = prefix, batch_size

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "test" and not callable(getattr(trainer.datamodule, "shifted_test_datasets", None)):
            raise RuntimeError(f"ShiftSweep needs a DataModule with shifted_test_datasets() -> {{name: dataset}}, got "
                               f"{type(trainer.datamodule).__name__}: wrap the data in lit_robust.datamodules."
                               "ShiftedDataModule(base, sweep=[...]) or add that method to your DataModule")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        accuracy = lambda k, **options: MulticlassAccuracy(k, average="micro", **options)  # noqa: E731
        return {f"{self.prefix}/{name}/acc": run_metric(trainer, pl_module, dataset, accuracy, self.item_format,
                                                        self.batch_size)
                for name, dataset in trainer.datamodule.shifted_test_datasets().items()}

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log_dict(self.evaluate(trainer, pl_module), sync_dist=False)  # the gathered numbers
