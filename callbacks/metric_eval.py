"""One evaluation of a classifier on extra datasets (poisoned, shifted views): each rank predicts its batches
(:func:`~lit_robust.callbacks.contract.shard_map`), the logits are gathered in order, and the metric is computed once
on the whole set, so every rank logs the single-process value."""
from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch.utils.data import Dataset
from torchmetrics import Metric

from lit_robust.callbacks.contract import ItemFormat, shard_map


@torch.no_grad()
def run_metric(trainer: L.Trainer, pl_module: L.LightningModule, dataset: Dataset,
               metric: Callable[..., Metric], item_format: ItemFormat, batch_size: int = 256) -> torch.Tensor:
    """The metric ``metric(K, sync_on_compute=False)`` (K: the number of classes, read off the logits) of
    ``pl_module(images)`` against the items' targets over ``dataset`` (items as the loader's). The metric sees the
    gathered whole, so it must not sync again; the module is evaluated in eval mode and left in the mode it was in."""
    was_training = pl_module.training
    pl_module.eval()
    device = pl_module.device
    out = shard_map(trainer, dataset, batch_size, lambda rows, images, targets: {
        "logits": pl_module(images.to(device)), "targets": targets.to(device)}, item_format)
    pl_module.train(was_training)
    computed = metric(out["logits"].shape[-1], sync_on_compute=False).to(device)
    computed.update(out["logits"], out["targets"])
    return computed.compute()
