"""Callbacks usable in any Lightning ``Trainer`` (no Hydra needed)."""
from lit_robust.callbacks.metrics_file import MetricsFile
from lit_robust.callbacks.poison_metrics import PoisonMetrics
from lit_robust.callbacks.purification import (DDPMPurification, EBMPurification, PureGenFilt, PureGenNaive,
                                                  PureGenReps, Purification)
from lit_robust.callbacks.shift_sweep import ShiftSweep

__all__ = ["MetricsFile", "PoisonMetrics", "Purification", "EBMPurification", "DDPMPurification", "PureGenNaive",
           "PureGenReps", "PureGenFilt", "ShiftSweep"]
