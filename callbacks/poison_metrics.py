"""Log poison success for any classifier trained on a ``PoisonedDataModule``: attack success at each trigger
multiplier (Eq. D.5, triggered attacks; BackdoorBench's ASR), the robust accuracy on the same triggered images
(BackdoorBench's RA: still given their true label), targeted success (Eq. D.4, GM/BP) and natural accuracy on the
clean test split (BackdoorBench's C-Acc). Metrics are torchmetrics, so values are exact across DDP ranks; keys land in metrics.json via MetricsFile."""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy

from lit_robust.callbacks.metric_eval import run_metric
from lit_robust.functional.poison_success import AttackSuccessRate, TargetedPoisonSuccess


class PoisonMetrics(L.Callback):
    """At the end of every test epoch, evaluate the model on the datamodule's triggered/target views and log
    ``poison/asr_x{k}`` and ``poison/ra_x{k}`` for each multiplier k, ``poison/target_success`` and
    ``poison/natural_acc``.

    Needs ``trainer.datamodule`` to provide ``poisons``, ``triggered_test_dataset``, ``target_dataset`` and
    ``eval_dataloader`` (``PoisonedDataModule`` does; a callback that replaces its ``train_dataset`` keeps them).
    """

    def __init__(self, multipliers: Sequence[float] = (1.0, 3.0), prefix: str = "poison"):
        self.multipliers = [float(m) for m in multipliers]
        self.prefix = prefix

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        datamodule = trainer.datamodule
        poisons = getattr(datamodule, "poisons", None)
        if poisons is None:
            raise RuntimeError("PoisonMetrics needs a PoisonedDataModule (data._target_: "
                               "lit_robust.datamodules.PoisonedDataModule); got "
                               f"{type(datamodule).__name__}")
        results = {f"{self.prefix}/natural_acc": run_metric(
            pl_module, datamodule.eval_dataloader(datamodule.test_dataset),
            MulticlassAccuracy(datamodule.num_classes, average="micro"))}
        if poisons.trigger is not None:
            for k in self.multipliers:
                loader = datamodule.eval_dataloader(datamodule.triggered_test_dataset(k))
                results[f"{self.prefix}/asr_x{k:g}"] = run_metric(pl_module, loader,
                                                                  AttackSuccessRate(poisons.target_class))
                results[f"{self.prefix}/ra_x{k:g}"] = run_metric(pl_module, loader, MulticlassAccuracy(
                    datamodule.num_classes, average="micro"))
        if poisons.target_index is not None:
            results[f"{self.prefix}/target_success"] = run_metric(
                pl_module, datamodule.eval_dataloader(datamodule.target_dataset()), TargetedPoisonSuccess())
        return results

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, value in self.evaluate(trainer, pl_module).items():
            pl_module.log(name, value.to(pl_module.device), sync_dist=False)  # already reduced by torchmetrics
