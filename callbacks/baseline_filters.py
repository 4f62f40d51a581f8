"""The baseline filters of seed 003's Table 1 as callbacks: each overrides only ``TrainingSetFilter.select``.

All three read the same representation, a weak learner trained on the whole (poisoned) training set
(``lit_robust.functional.backdoor_filters``); defaults follow seed 003 App. B at ε = 10 % of the source class.
"""
from __future__ import annotations

import torch

from lit_robust.callbacks.weak_learner_filter import TrainingSetFilter
from lit_robust.functional.backdoor_filters import (activation_clustering_keep, keep_below_top_fraction,
                                                    poisoned_model_features, spectral_signature_scores,
                                                    trimmed_loss_keep)


class SpectralSignatureFilter(TrainingSetFilter):
    """Remove the ``removal_fraction`` of every class with the largest spectral-signature score (App. B: 1.5 × the
    expected poison share of a class; 20 % at ε = 5–10 %)."""

    def __init__(self, removal_fraction: float = 0.2, feature_epochs: int = 10, hidden: int = 256, seed: int = 0,
                 cache_dir: str | None = None, **contract):
        super().__init__(seed, cache_dir, **contract)
        self.removal_fraction, self.feature_epochs, self.hidden = removal_fraction, feature_epochs, hidden

    def select(self, inputs, labels, num_classes, trainer):
        features = poisoned_model_features(inputs, labels, num_classes, self.feature_epochs, self.hidden,
                                           generator=torch.Generator().manual_seed(self.seed))
        return keep_below_top_fraction(spectral_signature_scores(features, labels), labels, self.removal_fraction)


class ActivationClusteringFilter(TrainingSetFilter):
    """Remove, per class, a 2-means cluster holding < ``size_threshold`` of the class (ART's defaults)."""

    def __init__(self, dims: int = 10, size_threshold: float = 0.35, feature_epochs: int = 10, hidden: int = 256,
                 seed: int = 0, cache_dir: str | None = None, **contract):
        super().__init__(seed, cache_dir, **contract)
        self.dims, self.size_threshold, self.feature_epochs, self.hidden = dims, size_threshold, feature_epochs, hidden

    def select(self, inputs, labels, num_classes, trainer):
        features = poisoned_model_features(inputs, labels, num_classes, self.feature_epochs, self.hidden,
                                           generator=torch.Generator().manual_seed(self.seed))
        return activation_clustering_keep(features, labels, self.dims, self.size_threshold, self.seed)


class TrimmedLossFilter(TrainingSetFilter):
    """ITLM: keep the ``keep_fraction`` lowest-loss samples after ``rounds`` of retraining (App. B: 96 % at ε = 10 %)."""

    def __init__(self, keep_fraction: float = 0.96, rounds: int = 3, first_epochs: int = 10, epochs: int = 5,
                 hidden: int = 256, seed: int = 0, cache_dir: str | None = None, **contract):
        super().__init__(seed, cache_dir, **contract)
        self.keep_fraction, self.rounds, self.first_epochs, self.epochs, self.hidden = (
            keep_fraction, rounds, first_epochs, epochs, hidden)

    def select(self, inputs, labels, num_classes, trainer):
        return trimmed_loss_keep(inputs, labels, num_classes, self.keep_fraction, self.rounds, self.first_epochs,
                                 self.epochs, self.hidden, generator=torch.Generator().manual_seed(self.seed))
