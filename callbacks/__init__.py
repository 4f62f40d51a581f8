"""Callbacks usable in any Lightning ``Trainer`` (no Hydra needed)."""
from lit_robust.callbacks.metrics_file import MetricsFile

__all__ = ["MetricsFile"]
from lit_robust.callbacks.poison_metrics import PoisonMetrics
from lit_robust.callbacks.shift_sweep import ShiftSweep
