"""Log poison success for any classifier trained on a poisoned DataModule (``PoisonedDataModule``): attack success at
each trigger multiplier (Eq. D.5, triggered attacks with a target class; BackdoorBench's ASR), the robust accuracy on
the same triggered images (BackdoorBench's RA: still given their true label), the bias-transfer ASR (Salman 2023,
Eq. 7.1: correctly classified test images the trigger makes wrong, any class), targeted success (Eq. D.4, GM/BP) and
natural accuracy on the test split the loop iterates (BackdoorBench's C-Acc). Every rank predicts its batches and logs the
single-process numbers through ``log_dict`` (every logger, and ``metrics.json`` through ``MetricsFile``)."""
from __future__ import annotations

from typing import Callable, Sequence

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit_robust.callbacks.contract import ContractCallback, evaluated_split
from lit_robust.callbacks.metric_eval import run_bias_asr, run_metric
from lit_robust.functional.poison_success import AttackSuccessRate, TargetedPoisonSuccess
from lit_robust.poisons import Poisons, apply_trigger

POISON_VIEWS = ("poisons", "triggered_test_dataset", "target_dataset")  # what the DataModule must provide


class PoisonMetrics(ContractCallback):
    """At the end of every test epoch, evaluate the model on the DataModule's triggered/target views and log
    ``poison/asr_x{k}`` (a trigger with a target class), ``poison/ra_x{k}`` and ``poison/bias_asr_x{k}`` (a
    ``Poisons`` trigger, applied to the clean test split) for each multiplier k, ``poison/target_success`` and
    ``poison/natural_acc``.

    Needs a DataModule with ``poisons``, ``triggered_test_dataset(k)`` and ``target_dataset()``
    (``PoisonedDataModule`` wrapping any base has them; a callback that replaces its train split keeps them), checked
    at setup. ``split`` / ``item_keys``: the clean test split and the item format (contract: :class:`ContractCallback`).
    """

    def __init__(self, multipliers: Sequence[float] = (1.0, 3.0), prefix: str = "poison", batch_size: int = 256,
                 split: str | Callable | None = None, item_keys: tuple | None = None):
        super().__init__(split, item_keys)
        self.multipliers = [float(m) for m in multipliers]
        self.prefix, self.batch_size = prefix, batch_size

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        missing = [name for name in POISON_VIEWS if not hasattr(trainer.datamodule, name)]
        if stage == "test" and missing:
            raise RuntimeError(f"PoisonMetrics needs a poisoned DataModule with {', '.join(POISON_VIEWS)}; "
                               f"{type(trainer.datamodule).__name__} has no {', '.join(missing)}: wrap the data in "
                               "lit_robust.datamodules.PoisonedDataModule(base, attack=...)")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        datamodule, poisons = trainer.datamodule, trainer.datamodule.poisons
        accuracy = lambda k, **options: MulticlassAccuracy(k, average="micro", **options)  # noqa: E731

        def metric(dataset, build) -> torch.Tensor:
            return run_metric(trainer, pl_module, dataset, build, self.item_format, self.batch_size)

        clean = evaluated_split(trainer, "test", self.split, "PoisonMetrics")
        results = {f"{self.prefix}/natural_acc": metric(clean, accuracy)}
        if poisons.trigger is not None:
            # Eq. 7.1 triggers the clean split itself: only a trigger this package stores (PoisonedDataModule)
            trigger = poisons.to(pl_module.device).trigger if isinstance(poisons, Poisons) else None
            for k in self.multipliers:
                triggered = datamodule.triggered_test_dataset(k)
                if poisons.target_class is not None:
                    results[f"{self.prefix}/asr_x{k:g}"] = metric(
                        triggered, lambda _, **options: AttackSuccessRate(poisons.target_class, **options))
                results[f"{self.prefix}/ra_x{k:g}"] = metric(triggered, accuracy)
                if trigger is not None:
                    results[f"{self.prefix}/bias_asr_x{k:g}"] = run_bias_asr(
                        trainer, pl_module, clean, lambda images, k=k: apply_trigger(images, trigger, k),
                        self.item_format, self.batch_size)
        if poisons.target_index is not None:
            results[f"{self.prefix}/target_success"] = metric(
                datamodule.target_dataset(), lambda _, **options: TargetedPoisonSuccess(**options))
        return results

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log_dict(self.evaluate(trainer, pl_module), sync_dist=False)  # the gathered numbers
