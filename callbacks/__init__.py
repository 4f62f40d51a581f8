"""Callbacks usable in any Lightning ``Trainer`` (no Hydra needed)."""
from lit_robust.callbacks.metrics_file import MetricsFile
from lit_robust.callbacks.robustness_report import AdversarialRobustnessReport, ShiftRobustnessReport
from lit_robust.callbacks.counterfactual_report import CounterfactualReport
from lit_robust.callbacks.latent_grid import LatentAugmentationGrid

__all__ = ["MetricsFile", "ShiftRobustnessReport", "AdversarialRobustnessReport", "CounterfactualReport",
           "LatentAugmentationGrid"]
