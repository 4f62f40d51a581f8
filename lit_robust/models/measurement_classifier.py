"""A classifier of measurement rows (B, F) rather than images: the discriminative DNN baseline of deep CAMA's
measurement experiment (seed 002 §4.2), with ``ImageClassifier``'s training, metrics and optimisers."""
from __future__ import annotations

import torch

from lit_robust.models.classifier import ImageClassifier


class MeasurementClassifier(ImageClassifier):
    """``ImageClassifier`` whose inputs are rows of F measurements, standardised by ``mean`` / ``std`` (one value
    each, or F) before a row backbone such as ``dense`` with ``in_features=F``."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net((rows - self.mean.flatten()) / self.std.flatten())
