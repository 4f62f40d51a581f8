"""Many source models on class subsets, trained together and transferred by linear probes, for transfer influences
(thesis 001 ch. 8, Algorithm 1 and Eq. 8.1; the estimator is :mod:`lit_robust.functional.transfer_influence`).

One process trains all M small source networks at every step, each on its own classes (the datamodule's
``ClassSubsetsDataModule`` stacks one example per model), so a run is one Lightning fit whatever M: under DDP the
trainer shares every model's data across the ranks and averages the gradients, as for any data-parallel model. At
test time each frozen extractor gets a linear probe fitted on the target's training images (fixed-feature
transfer), the probes are scored on the target's test images, and the influence of every source class on every
target example is computed from the (model × example) outcomes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities.distributed import gather_all_tensors
from typing_extensions import override

from lit_robust.datasets import stack_dataset
from lit_robust.functional.augment import random_shift
from lit_robust.functional.transfer_influence import (OUTCOMES, classes_never_varied, fit_linear_probes,
                                                      influence_by_target_class, transfer_influence,
                                                      transfer_outcome)
from lit_robust.models.nets import create_backbone
from lit_robust.storage.cache import save_atomic

RESULTS_FILE = "transfer_influence.pt"


def interleave_rank_shards(shards: Sequence[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """Undo an unpadded, unshuffled distributed sampler along ``dim``: rank r held items r, r + W, …, so the single-
    process order puts shard r's i-th item at r + i·W."""
    shape = list(shards[0].shape)
    shape[dim] = sum(shard.shape[dim] for shard in shards)
    merged = shards[0].new_empty(shape)
    for rank, shard in enumerate(shards):
        positions = torch.arange(rank, shape[dim], len(shards), device=shard.device)
        merged.index_copy_(dim % merged.dim(), positions, shard)
    return merged


class ClassSubsetEnsemble(L.LightningModule):
    """``num_models`` networks of ``backbone``, model m trained with cross-entropy over its own classes only (the
    logits of the classes outside its subset are masked), on [0, 1] images normalised by ``mean``/``std`` with a
    random shift of up to ``max_shift`` pixels. Test: per-model linear probes (``probe_weight_decay``) on the
    target task; logs ``test/acc`` (target accuracy averaged over the models) and, when every class is in some
    subsets and out of others, the influence summary; writes ``transfer_influence.pt`` (subsets, outcomes,
    per-model accuracy, influences) to the trainer's ``default_root_dir``.

    Args:
        outcome: f(t; S) of Eq. 8.1 — ``softmax`` (true-class probability, the thesis'), ``correct`` or ``margin``.
    """

    def __init__(self, num_models: int = 64, backbone: str = "small_cnn", num_classes: int = 10, in_chans: int = 1,
                 backbone_kwargs: dict | None = None, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 max_shift: int = 1, lr: float = 2e-3, weight_decay: float = 5e-4, outcome: str = "softmax",
                 probe_weight_decay: float = 1e-3, probe_max_iter: int = 200):
        super().__init__()
        if outcome not in OUTCOMES:
            raise ValueError(f"model.outcome={outcome!r}: use one of {OUTCOMES}")
        if num_models < 1:
            raise ValueError(f"model.num_models={num_models}: train at least one source model")
        self.save_hyperparameters()
        self.nets = nn.ModuleList(create_backbone(backbone, num_classes=num_classes, in_chans=in_chans,
                                                  **(backbone_kwargs or {})) for _ in range(num_models))
        self.register_buffer("included", torch.ones(num_models, num_classes, dtype=torch.bool))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.probes: tuple[torch.Tensor, torch.Tensor] | None = None
        self.test_acc: MulticlassAccuracy | None = None
        self.test_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @override
    def setup(self, stage: str) -> None:
        masks = getattr(getattr(self.trainer, "datamodule", None), "subset_masks", None)
        if masks is None:
            raise ValueError("ClassSubsetEnsemble needs its source classes per model: use a ClassSubsetsDataModule "
                             "(data=class_subsets_digits)")
        if tuple(masks.shape) != tuple(self.included.shape):
            raise ValueError(f"the data gives {masks.shape[0]} subsets of {masks.shape[1]} classes but model."
                             f"num_models={self.hparams.num_models}, model.num_classes={self.hparams.num_classes}: "
                             "set model.num_models=${data.num_subsets} and model.num_classes to the source's classes")
        self.included.copy_(masks)

    def source_logits(self, model: int, images: torch.Tensor) -> torch.Tensor:
        """Model ``model``'s logits over its own classes (the others −inf: a classifier of its subset)."""
        logits = self.nets[model]((images - self.mean) / self.std)
        return logits.masked_fill(~self.included[model], float("-inf"))

    def features(self, model: int, images: torch.Tensor) -> torch.Tensor:
        """The input of model ``model``'s last linear layer: the frozen features its probe reads."""
        net, normalised = self.nets[model], (images - self.mean) / self.std
        if hasattr(net, "forward_head"):  # timm models
            return net.forward_head(net.forward_features(normalised), pre_logits=True)
        return net.forward_features(normalised)

    @override
    def training_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]  # (B, M, C, H, W), (B, M): model m's own examples in column m
        losses = torch.stack([F.cross_entropy(self.source_logits(m, random_shift(images[:, m], self.hparams.max_shift)),
                                              labels[:, m]) for m in range(len(self.nets))])
        if not torch.isfinite(losses).all():
            raise FloatingPointError(f"source models {torch.nonzero(~torch.isfinite(losses)).flatten().tolist()} "
                                     f"diverged at step {self.global_step}; lower model.lr")
        self.log("train/loss", losses.mean(), prog_bar=True)
        return losses.sum()  # each model's gradient is that of its own mean loss

    @override
    def validation_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        for m in range(len(self.nets)):
            own = self.included[m, labels]
            if own.any():
                self.val_acc.update(self.source_logits(m, images[own]), labels[own])
        self.log("val/acc", self.val_acc, prog_bar=True)

    @override
    def on_test_start(self) -> None:
        """Fit every model's linear probe on the target's training images (each rank fits the same probes)."""
        datamodule = self.trainer.datamodule
        images, labels = stack_dataset(datamodule.target_train_dataset)
        images, labels = images.to(self.device), labels.to(self.device)
        classes = datamodule.target_num_classes
        features = torch.stack([torch.cat([self.features(m, chunk) for chunk in images.split(512)])
                                for m in range(len(self.nets))])
        with torch.inference_mode(False):
            self.probes = fit_linear_probes(features.clone(), labels.clone(), classes,
                                            self.hparams.probe_weight_decay, self.hparams.probe_max_iter)
        self.test_acc = MulticlassAccuracy(classes, average="micro").to(self.device)
        self.test_rows = []

    def probe_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(M, B, target classes): every transferred model's logits."""
        weight, bias = self.probes
        features = torch.stack([self.features(m, images) for m in range(len(self.nets))])
        return features @ weight + bias.unsqueeze(1)

    @override
    def test_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        logits = self.probe_logits(images)
        self.test_acc.update(logits.flatten(0, 1), labels.repeat(len(self.nets)))
        self.log("test/acc", self.test_acc)
        self.test_rows.append((transfer_outcome(logits, labels, self.hparams.outcome),
                               transfer_outcome(logits, labels, "correct"), labels))

    def gathered(self, index: int) -> torch.Tensor:
        """Column ``index`` of the test rows over the whole target test split, in its single-process order."""
        local = torch.cat([row[index] for row in self.test_rows], dim=-1)
        if self.trainer.world_size == 1:
            return local
        return interleave_rank_shards(gather_all_tensors(local.contiguous()))

    @override
    def on_test_epoch_end(self) -> None:
        outcomes, correct, labels = (self.gathered(i) for i in range(3))
        results = {"included": self.included.cpu(), "outcome": self.hparams.outcome, "outcomes": outcomes.cpu(),
                   "target_acc": correct.mean(1).cpu(), "target_labels": labels.cpu()}
        if classes_never_varied(self.included):
            rank_zero_info("some source classes are in every subset or in none: no influences computed")
        else:
            results["influence"] = transfer_influence(self.included, outcomes).cpu()
            by_class = influence_by_target_class(results["influence"], results["target_labels"],
                                                 self.trainer.datamodule.target_num_classes)
            results["influence_by_target_class"] = by_class
            self.log_dict(influence_summary(by_class), sync_dist=False)
        if self.trainer.is_global_zero:
            save_atomic(Path(self.trainer.default_root_dir) / RESULTS_FILE, results)
        self.test_rows = []

    @override
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=self.hparams.lr * 1e-3)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def influence_summary(by_class: torch.Tensor) -> dict[str, float]:
    """The headline numbers of a (source class × target class) influence matrix whose classes correspond: the mean
    diagonal and off-diagonal influence, and the fraction of target classes whose most positive source class is their
    own; target classes without test examples (NaN columns) are left out. Empty when the class counts differ."""
    if by_class.shape[0] != by_class.shape[1]:
        return {}
    seen = ~by_class.isnan().any(0)
    diagonal = torch.eye(by_class.shape[0], dtype=torch.bool)
    own = by_class.nan_to_num(float("-inf")).argmax(0) == torch.arange(by_class.shape[1])
    return {"test/influence_diagonal": float(by_class[diagonal & seen].mean()),
            "test/influence_off_diagonal": float(by_class[~diagonal & seen].mean()),
            "test/own_class_most_positive": float(own[seen].float().mean())}
