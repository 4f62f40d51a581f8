"""Callbacks usable in any Lightning ``Trainer`` (no Hydra needed)."""
from lit_robust.callbacks.metrics_file import MetricsFile

__all__ = ["MetricsFile"]
from lit_robust.callbacks.ood_detection import OODDetection
