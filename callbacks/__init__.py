"""Callbacks usable in any Lightning ``Trainer`` (no Hydra needed)."""
from lit_robust.callbacks.metrics_file import MetricsFile
from lit_robust.callbacks.certification import Certification

__all__ = ["MetricsFile", "Certification"]
