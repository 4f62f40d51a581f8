"""Callbacks usable in any Lightning ``Trainer`` (no Hydra needed)."""
from lit_robust.callbacks.adversarial_evaluation import AdversarialEvaluation
from lit_robust.callbacks.baseline_filters import (ActivationClusteringFilter, SpectralSignatureFilter,
                                                   TrimmedLossFilter)
from lit_robust.callbacks.certification import Certification
from lit_robust.callbacks.controlled_variation import ControlledVariationReport
from lit_robust.callbacks.patchcleanser import PatchCleanserCertification
from lit_robust.callbacks.counterfactual_report import CounterfactualReport
from lit_robust.callbacks.exact_resume import CSVHistory, RNGState
from lit_robust.callbacks.last_checkpoint import LastCheckpoint
from lit_robust.callbacks.latent_grid import LatentAugmentationGrid
from lit_robust.callbacks.metrics_file import MetricsFile
from lit_robust.callbacks.missingness import MissingnessReport
from lit_robust.callbacks.ood_detection import OODDetection
from lit_robust.callbacks.poison_metrics import PoisonMetrics
from lit_robust.callbacks.purification import (DDPMPurification, EBMPurification, JPEGPurification, PureGenFilt,
                                               PureGenNaive, PureGenReps, Purification)
from lit_robust.callbacks.robustness_report import AdversarialRobustnessReport, ShiftRobustnessReport
from lit_robust.callbacks.shift_sweep import ShiftSweep
from lit_robust.callbacks.weak_learner_filter import TrainingSetFilter, WeakLearnerFilter

__all__ = ["ActivationClusteringFilter", "AdversarialEvaluation", "AdversarialRobustnessReport", "Certification",
           "ControlledVariationReport", "CounterfactualReport", "CSVHistory", "LastCheckpoint", "DDPMPurification", "EBMPurification",
           "JPEGPurification", "LatentAugmentationGrid", "MetricsFile", "MissingnessReport", "OODDetection",
           "PatchCleanserCertification", "PoisonMetrics", "PureGenFilt", "PureGenNaive", "PureGenReps", "Purification",
           "RNGState", "ShiftRobustnessReport", "ShiftSweep", "SpectralSignatureFilter", "TrainingSetFilter",
           "TrimmedLossFilter", "WeakLearnerFilter"]
