"""lit-robust: a PyTorch Lightning trainer for robust machine learning.

``lit_robust`` holds the LightningModules and shared nets; ``lit_robust.datamodules`` the clean, poisoned and shifted
data; ``lit_robust.callbacks`` the defences (purification, certification, filtering, OOD detection) usable in any
Lightning ``Trainer``.
"""
from lit_robust.bayesian_vae import BayesianVAE
from lit_robust.causal_vae import CausalVAE
from lit_robust.classifier import ImageClassifier
from lit_robust.ddpm import DDPM
from lit_robust.deep_cama import DeepCAMA
from lit_robust.ebm import EBM
from lit_robust.lavae import LAVAE
from lit_robust.smoothed_classifier import SmoothedClassifier
from lit_robust.smoothed_vit import SmoothedViT
from lit_robust.transfer_classifier import TransferClassifier

__all__ = ["BayesianVAE", "CausalVAE", "DDPM", "DeepCAMA", "EBM", "ImageClassifier", "LAVAE", "SmoothedClassifier", "SmoothedViT",
           "TransferClassifier"]
