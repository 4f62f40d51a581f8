"""DataModules of [0, 1] images: embedded (digits, pendulum), torchvision datasets, and wrappers (poisoned, shifted,
relabelled, class subsets, controlled scenes); and tables of causal variables (the SCNN exam SEMs, the tabular
pendulum, random linear DAGs, the Learning Mindsets stand-in, deep CAMA's measurement rows)."""
from lit_robust.datamodules.base import ImageDataModule
from lit_robust.datamodules.class_subsets import ClassSubsetsDataModule, ClassSubsetsDataset
from lit_robust.datamodules.controlled_scenes import ControlledScenesDataModule
from lit_robust.datamodules.digits import DigitsDataModule
from lit_robust.datamodules.ood import OODPairDataModule
from lit_robust.datamodules.pendulum import PendulumDataModule
from lit_robust.datamodules.poisoned import PoisonedDataModule
from lit_robust.datamodules.relabelled import RelabelledDataModule
from lit_robust.datamodules.shifted import ShiftedDataModule
from lit_robust.datamodules.tabular import (ExamSEMDataModule, MeasurementDataModule, MindsetDataModule,
                                           PendulumTableDataModule, RandomDAGDataModule, TabularDataModule)
from lit_robust.datamodules.torchvision_sets import TorchvisionDataModule
from lit_robust.datasets import TensorImageDataset, stack_dataset

__all__ = ["ClassSubsetsDataModule", "ClassSubsetsDataset", "ControlledScenesDataModule", "DigitsDataModule",
           "ExamSEMDataModule", "ImageDataModule", "MeasurementDataModule", "MindsetDataModule", "OODPairDataModule",
           "PendulumDataModule", "PendulumTableDataModule", "PoisonedDataModule", "RandomDAGDataModule",
           "RelabelledDataModule", "ShiftedDataModule", "TabularDataModule", "TensorImageDataset",
           "TorchvisionDataModule", "stack_dataset"]
