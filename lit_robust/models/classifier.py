"""The plain image classifier that every defence protects (and that the attacks target)."""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from lit_robust.functional.augment import random_hflip, random_masking, random_region_removal, random_shift
from lit_robust.functional.double_masking import mask_set
from lit_robust.models.nets import create_backbone, load_weights


class ImageClassifier(L.LightningModule):
    """Backbone + cross-entropy, trained on [0, 1] images; normalisation, augmentation and the schedule live here so
    that data wrappers (poisoning, purification) always work in pixel space.

    Args:
        backbone: ``small_cnn``, ``resnet18_cifar``, ``preact_resnet18_cifar`` or any timm model name.
        mean, std: per-channel normalisation applied inside ``forward`` (length 1 or ``in_chans``).
        max_shift, hflip: batched train-time augmentation (RandomCrop(padding=max_shift), horizontal flip).
        mask_patch_sizes, mask_k: train-time Cutout with PatchCleanser's mask sets R of these patch sizes and k
            (``augment.random_masking``: up to two masks per image); empty: off.
        missingness_region, missingness_fraction: missingness augmentation (001 ch. 5): black out this fraction of
            the region×region patches of every training image (the chapter: 0.5); 0: off.
        optimizer: ``sgd`` (momentum 0.9, Nesterov off, as the purification paper's ResNet recipe) or ``adamw``.
        scheduler: ``cosine`` (timm, with ``warmup_epochs``), ``multistep`` (×0.1 at ``milestones``) or ``none``.
        weights_path: start from these weights (the papers' pretrained models enter here; nothing is downloaded).
    """

    def __init__(self, backbone: str = "small_cnn", num_classes: int = 10, in_chans: int = 1,
                 backbone_kwargs: dict | None = None, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 max_shift: int = 0, hflip: bool = False, label_smoothing: float = 0.0,
                 optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 5e-4, momentum: float = 0.9,
                 scheduler: str = "cosine", warmup_epochs: int = 0, milestones: Sequence[int] = (100, 150),
                 weights_path: str | None = None, mask_patch_sizes: Sequence[int] = (), mask_k: int = 6,
                 missingness_region: int = 4, missingness_fraction: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = create_backbone(backbone, num_classes=num_classes, in_chans=in_chans, **(backbone_kwargs or {}))
        if weights_path:
            load_weights(self.net, weights_path)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.metrics = nn.ModuleDict({f"{split}_acc": MulticlassAccuracy(num_classes, average="micro")
                                      for split in ("train", "val", "test")})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for [0, 1] images."""
        return self.net((images - self.mean) / self.std)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        images = random_shift(images, self.hparams.max_shift)
        images = random_hflip(images) if self.hparams.hflip else images
        if self.hparams.get("missingness_fraction"):
            images = random_region_removal(images, self.hparams.missingness_region, self.hparams.missingness_fraction)
        sizes = self.hparams.get("mask_patch_sizes") or ()
        if not sizes:
            return images
        masks = torch.cat([mask_set(tuple(images.shape[-2:]), m, self.hparams.mask_k) for m in sizes])
        return random_masking(images, masks)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss minimised on an augmented batch and the logits its accuracy is logged from (the one method a
        training variant such as :class:`~lit_robust.AdversarialClassifier` overrides)."""
        logits = self(images)
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing), logits

    def training_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        loss, logits = self.training_loss(self.augment(images), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.global_step}; "
                                     "lower model.lr or check the input data for NaN")
        self.metrics["train_acc"](logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.metrics["train_acc"], on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch, split: str) -> None:
        images, labels = batch[0], batch[1]
        logits = self(images)
        self.metrics[f"{split}_acc"](logits, labels)
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log(f"{split}/acc", self.metrics[f"{split}_acc"], prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"model.optimizer={hp.optimizer!r}: use 'sgd' or 'adamw'")
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "cosine":
            scheduler = CosineLRScheduler(optimizer, t_initial=epochs, warmup_t=hp.warmup_epochs,
                                          warmup_lr_init=hp.lr * 0.01, lr_min=hp.lr * 1e-3)
        elif hp.scheduler == "multistep":
            scheduler = MultiStepLRScheduler(optimizer, decay_t=list(hp.milestones), decay_rate=0.1)
        else:
            raise ValueError(f"model.scheduler={hp.scheduler!r}: use 'cosine', 'multistep' or 'none'")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def lr_scheduler_step(self, scheduler, metric):
        """timm schedulers step by epoch number rather than by call."""
        scheduler.step(epoch=self.current_epoch + 1)


def train_on_tensors(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, backbone: str = "small_cnn",
                    epochs: int = 10, lr: float = 2e-3, weight_decay: float = 5e-4, batch_size: int = 128,
                    max_shift: int = 2, generator: torch.Generator, progress: bool = True,
                    desc: str = "surrogate", model: ImageClassifier | None = None,
                     cosine_schedule: bool = True) -> ImageClassifier:
    """Train (or continue training ``model``) with AdamW + cross-entropy on [0, 1] image tensors, without Lightning;
    returns it in eval mode. The classifier's own recipe (normalisation, random-shift augmentation), so attack
    surrogates are grey-box stand-ins for the victim (Witches' Brew §4, Narcissus §3); ``weight_decay=0`` with
    ``cosine_schedule=False`` is plain Adam at a constant rate.
    """
    if model is None:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = ImageClassifier(backbone=backbone, num_classes=num_classes, in_chans=images.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(images) // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch) if cosine_schedule else None
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(batch_size):
            x = random_shift(images[batch], max_shift, generator=generator)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()
