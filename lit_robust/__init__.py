"""lit-robust: a PyTorch Lightning trainer for robust machine learning.

``lit_robust`` holds the LightningModules and shared nets; ``lit_robust.datamodules`` the clean, poisoned and shifted
data; ``lit_robust.callbacks`` the defences (purification, certification, filtering, OOD detection) usable in any
Lightning ``Trainer``.
"""
from lit_robust.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
from lit_robust.transfer_classifier import TransferClassifier
