"""Accuracy under each shift of a ``ShiftedDataModule``'s sweep, logged as ``shift/<name>/acc`` at test time
(torchmetrics, so exact across DDP ranks); "accuracy falls as the shift grows" is read off these keys."""
from __future__ import annotations

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy

from lit_robust.callbacks.metric_eval import run_metric


class ShiftSweep(L.Callback):
    """At the end of every test epoch, evaluate the model on ``trainer.datamodule.shifted_test_datasets()``."""

    def __init__(self, prefix: str = "shift"):
        self.prefix = prefix

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "shifted_test_datasets"):
            raise RuntimeError("ShiftSweep needs a ShiftedDataModule (data._target_: "
                               f"lit_robust.datamodules.ShiftedDataModule); got {type(datamodule).__name__}")
        return {f"{self.prefix}/{name}/acc": run_metric(pl_module, datamodule.eval_dataloader(dataset),
                                                        MulticlassAccuracy(datamodule.num_classes, average="micro"))
                for name, dataset in datamodule.shifted_test_datasets().items()}

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, value in self.evaluate(trainer, pl_module).items():
            pl_module.log(name, value.to(pl_module.device), sync_dist=False)  # already reduced by torchmetrics
