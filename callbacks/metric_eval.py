"""One evaluation loop shared by the callbacks that score a model on extra datasets (poisoned, shifted views)."""
from __future__ import annotations

import lightning as L
import torch
from torchmetrics import Metric


@torch.no_grad()
def run_metric(pl_module: L.LightningModule, loader, metric: Metric) -> torch.Tensor:
    """Feed ``pl_module(images)`` and the batch's second item to ``metric`` over ``loader``; returns the computed
    (rank-synced) value. The module is evaluated in eval mode and left in the mode it was in."""
    was_training = pl_module.training
    pl_module.eval()
    metric = metric.to(pl_module.device)
    for batch in loader:
        metric.update(pl_module(batch[0].to(pl_module.device)), batch[1].to(pl_module.device))
    pl_module.train(was_training)
    return metric.compute()
