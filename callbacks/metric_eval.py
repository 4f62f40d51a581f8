"""Evaluations of a classifier on extra datasets (poisoned, shifted views): each rank predicts its batches
(:func:`~lit_robust.callbacks.contract.shard_map`), the outputs are gathered in order, and the number is computed once
on the whole set, so every rank logs the single-process value."""
from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch.utils.data import Dataset
from torchmetrics import Metric

from lit_robust.callbacks.contract import ItemFormat, shard_map
from lit_robust.functional.bias_transfer import bias_asr, bias_asr_counts


@torch.no_grad()
def run_in_eval_mode(trainer: L.Trainer, pl_module: L.LightningModule, dataset: Dataset,
                     compute: Callable[..., dict], item_format: ItemFormat, batch_size: int = 256) -> dict:
    """:func:`shard_map` of ``compute(rows, images, targets)`` (both on the module's device) over ``dataset``, with
    the module in eval mode and left in the mode it was in."""
    was_training = pl_module.training
    pl_module.eval()
    device = pl_module.device
    try:
        return shard_map(trainer, dataset, batch_size, lambda rows, images, targets: compute(
            rows, images.to(device), targets.to(device)), item_format)
    finally:
        pl_module.train(was_training)


def run_metric(trainer: L.Trainer, pl_module: L.LightningModule, dataset: Dataset,
               metric: Callable[..., Metric], item_format: ItemFormat, batch_size: int = 256) -> torch.Tensor:
    """The metric ``metric(K, sync_on_compute=False)`` (K: the number of classes, read off the logits) of
    ``pl_module(images)`` against the items' targets over ``dataset`` (items as the loader's). The metric sees the
    gathered whole, so it must not sync again."""
    out = run_in_eval_mode(trainer, pl_module, dataset, lambda rows, images, targets: {
        "logits": pl_module(images), "targets": targets}, item_format, batch_size)
    computed = metric(out["logits"].shape[-1], sync_on_compute=False).to(pl_module.device)
    computed.update(out["logits"], out["targets"])
    return computed.compute()


def run_bias_asr(trainer: L.Trainer, pl_module: L.LightningModule, dataset: Dataset,
                 trigger: Callable[[torch.Tensor], torch.Tensor], item_format: ItemFormat,
                 batch_size: int = 256) -> torch.Tensor:
    """Eq. 7.1 (:func:`~lit_robust.functional.bias_transfer.bias_asr_counts`) of ``pl_module`` over the clean
    ``dataset`` with ``trigger`` (images on the module's device → triggered images): every batch's counts, summed
    over batches and ranks."""
    def counts(rows, images, targets):
        flipped, correct = bias_asr_counts(pl_module, images, targets, trigger, batch_size=len(rows))
        return {"counts": (torch.stack([flipped, correct])[None], rows[:1])}  # one row per batch
    flipped, correct = run_in_eval_mode(trainer, pl_module, dataset, counts, item_format, batch_size)["counts"].sum(0)
    return torch.tensor(bias_asr(flipped, correct))
