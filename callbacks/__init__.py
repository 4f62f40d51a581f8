"""Callbacks usable in any Lightning ``Trainer`` (no Hydra needed)."""
from lit_robust.callbacks.metrics_file import MetricsFile

__all__ = ["MetricsFile"]
from lit_robust.callbacks.poison_metrics import PoisonMetrics
from lit_robust.callbacks.shift_sweep import ShiftSweep
from lit_robust.callbacks.weak_learner_filter import TrainingSetFilter, WeakLearnerFilter
from lit_robust.callbacks.baseline_filters import ActivationClusteringFilter, SpectralSignatureFilter, TrimmedLossFilter
__all__ += ["TrainingSetFilter", "WeakLearnerFilter", "ActivationClusteringFilter", "SpectralSignatureFilter",
            "TrimmedLossFilter"]
