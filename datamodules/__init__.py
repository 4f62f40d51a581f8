"""DataModules of [0, 1] images: embedded (digits, pendulum), torchvision datasets, and wrappers."""
from lit_robust.datamodules.base import ImageDataModule, TensorImageDataset, stack_dataset
from lit_robust.datamodules.digits import DigitsDataModule
from lit_robust.datamodules.pendulum import PendulumDataModule
from lit_robust.datamodules.torchvision_sets import TorchvisionDataModule

__all__ = ["ImageDataModule", "TensorImageDataset", "stack_dataset", "DigitsDataModule", "PendulumDataModule",
           "TorchvisionDataModule"]
from lit_robust.datamodules.poisoned import PoisonedDataModule
from lit_robust.datamodules.shifted import ShiftedDataModule
