"""Unadversarial examples (Salman et al. 2021; thesis 001 ch. 3) as a LightningModule: per-class textures or patches
trained for a frozen classifier, then tested clean, under the common corruptions at severities 1–5 and with a
conflicting pattern, beside the baselines that fill the same carrier with nothing, noise or the best training image."""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from typing_extensions import override

from lit_robust.functional.shifts import COMMON_CORRUPTIONS, corrupt
from lit_robust.functional.unadversarial_patterns import (STROKE_THRESHOLD, apply_patch, apply_texture,
                                                          best_per_class, conflicting_labels, corner_positions,
                                                          unadversarial_loss)
from lit_robust.models.classifier import ImageClassifier

CARRIERS = ("texture", "patch")
VARIANTS = ("none", "random", "best_image", "unadversarial")


class Unadversarial(L.LightningModule):
    """Trains ``pattern`` (K per-class textures of the image's size, or K p×p patches) to minimise the frozen
    classifier's loss on the patterned training images (Eq. 3.2); the classifier never changes.

    Args:
        classifier_path: a Lightning checkpoint of :class:`~lit_robust.ImageClassifier` (e.g. ``digits_classifier``'s
            ``checkpoints/best.ckpt``), loaded and frozen.
        carrier: ``texture`` (on the object's stroke mask, pixels above ``threshold``) or ``patch`` (``patch_size``
            square in a random corner per image).
        lr: Adam's step on the pattern (pixels in [0, 1], clamped after each step); ``init_std``: the pattern starts at
            N(0.5, init_std²) as the reference code's.
        corruptions, severities: the test's common corruptions (``lit_robust.functional.shifts.COMMON_CORRUPTIONS``).
        seed: the random baseline's pattern, the patch positions and the noise draws of the test.

    Test metrics ``test/<variant>/<corruption>_s<severity>``, ``test/<variant>/clean``, the mean over corruptions
    ``test/<variant>/corrupted_s<severity>`` and, for the patterned variants,
    ``test/<variant>/conflict_follows_pattern``
    / ``conflict_follows_image`` (the pattern of another class on the object: which one the prediction follows).
    """

    def __init__(self, classifier_path: str, carrier: str = "texture", num_classes: int = 10, in_chans: int = 1,
                 img_size: int = 28, patch_size: int = 7, threshold: float = STROKE_THRESHOLD, lr: float = 0.1,
                 init_std: float = 0.1, corruptions: Sequence[str] = tuple(COMMON_CORRUPTIONS),
                 severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0):
        super().__init__()
        if carrier not in CARRIERS:
            raise ValueError(f"model.carrier={carrier!r}: use one of {CARRIERS}")
        unknown = sorted(set(corruptions) - set(COMMON_CORRUPTIONS))
        if unknown:
            raise ValueError(f"model.corruptions {unknown} unknown: use names from {sorted(COMMON_CORRUPTIONS)}")
        self.save_hyperparameters()
        self.classifier = ImageClassifier.load_from_checkpoint(classifier_path, map_location="cpu", weights_only=True)
        self.classifier.requires_grad_(False)
        side = img_size if carrier == "texture" else patch_size
        shape = (num_classes, in_chans, side, side)
        generator = torch.Generator().manual_seed(seed)
        self.pattern = torch.nn.Parameter((0.5 + init_std * torch.randn(shape, generator=generator)).clamp(0, 1))
        self.register_buffer("random_pattern", torch.rand(shape, generator=generator))
        # the best training image per class, found while training (each class's lowest clean loss seen so far)
        self.register_buffer("best_image", torch.zeros(num_classes, in_chans, img_size, img_size))
        self.register_buffer("best_loss", torch.full((num_classes,), torch.finfo(torch.float32).max))

    @override
    def on_train_batch_start(self, batch, batch_idx) -> None:
        """The classifier stays in eval mode (its BatchNorm statistics are part of the fixed model); set per batch, as
        the loops put back the modes they found around validation."""
        self.classifier.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def contents(self, variant: str) -> torch.Tensor | None:
        """What the carrier holds for ``variant`` (None: the images as they are)."""
        if variant == "none":
            return None
        if variant == "best_image":
            if self.hparams.carrier == "texture":
                return self.best_image
            return F.interpolate(self.best_image, size=self.pattern.shape[-2:], mode="area")
        return self.random_pattern if variant == "random" else self.pattern

    def carry(self, images: torch.Tensor, labels: torch.Tensor, contents: torch.Tensor | None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """``images`` with the pattern of class ``labels[i]`` on image i (textures on the stroke, patches in a corner
        drawn from ``generator``)."""
        if contents is None:
            return images
        if self.hparams.carrier == "texture":
            return apply_texture(images, labels, contents, self.hparams.threshold)
        positions = corner_positions(len(images), tuple(images.shape[-2:]), self.hparams.patch_size, generator)
        return apply_patch(images, labels, contents, positions)

    def remember_best_images(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep per class the lowest-loss image among the ones kept so far and this batch's."""
        with torch.no_grad():
            losses = unadversarial_loss(self(images), labels)
            classes = torch.arange(self.hparams.num_classes, device=labels.device)
            best = best_per_class(torch.cat([classes, labels]), torch.cat([self.best_loss, losses]), len(classes))
            self.best_image.copy_(torch.cat([self.best_image, images])[best])
            self.best_loss.copy_(torch.cat([self.best_loss, losses])[best])

    def training_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        if self.current_epoch == 0:
            self.remember_best_images(images, labels)
        loss = unadversarial_loss(self(self.carry(images, labels, self.pattern)), labels).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.pattern.clamp_(0.0, 1.0)

    def validation_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        generator = torch.Generator().manual_seed(self.hparams.seed + batch_idx)
        logits = self(self.carry(images, labels, self.pattern, generator))
        self.log("val/acc", (logits.argmax(-1) == labels).float().mean(), prog_bar=True, batch_size=len(images))
        self.log("val/loss", unadversarial_loss(logits, labels).mean(), batch_size=len(images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (self(images).argmax(-1) == labels).float().mean()

    def test_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        hp, n = self.hparams, len(images)
        conflicts = conflicting_labels(labels, hp.num_classes, torch.Generator().manual_seed(hp.seed + batch_idx))
        for variant in VARIANTS:
            contents = self.contents(variant)
            # the same positions and noise draws for every variant: the rows differ only in the pattern
            generator = torch.Generator().manual_seed(hp.seed + batch_idx)
            patterned = self.carry(images, labels, contents, generator)
            metrics = {f"test/{variant}/clean": self.accuracy(patterned, labels)}
            for severity in hp.severities:
                per_corruption = {f"test/{variant}/{name}_s{severity}": self.accuracy(
                    corrupt(patterned, name, severity, generator), labels) for name in hp.corruptions}
                metrics.update(per_corruption)
                metrics[f"test/{variant}/corrupted_s{severity}"] = torch.stack(list(per_corruption.values())).mean()
            if contents is not None:
                predictions = self(self.carry(images, conflicts, contents, generator)).argmax(-1)
                metrics[f"test/{variant}/conflict_follows_pattern"] = (predictions == conflicts).float().mean()
                metrics[f"test/{variant}/conflict_follows_image"] = (predictions == labels).float().mean()
            self.log_dict(metrics, batch_size=n)

    def configure_optimizers(self):
        return torch.optim.Adam([self.pattern], lr=self.hparams.lr)
