"""Real datasets read from ``data_dir`` through torchvision's own classes (downloaded only when ``download=True``).

CIFAR-10 (``cifar-10-batches-py``), MNIST and Fashion-MNIST (``<Name>/raw`` idx files), SVHN (``train_32x32.mat``,
``test_32x32.mat``), CINIC-10 (an ImageFolder tree ``cinic-10/{train,valid,test}/<class>/*.png``, no download) and
ImageNet-1k (torchvision's ``ImageNet`` layout: ``meta.bin`` + ``train/<wnid>/*.JPEG`` + ``val/<wnid>/*.JPEG``, made by
torchvision from the official archives; no download; resized to 256 and centre-cropped to 224, the usual evaluation
transform — the paper's flips happen in the model). A validation split is carved out of the training set with a
fixed seed (CINIC-10 has its own ``valid``; ImageNet's ``val`` is the test split).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from lit_robust.datamodules.base import ImageDataModule, check_labels
from lit_robust.storage.cache import check_writable
from lit_robust.storage.run_paths import expand_path
from lit_robust.storage.serialization import CorruptFileError

TO_TENSOR = transforms.ToTensor()

# name -> (dataset class, channels, what must exist under data_dir, how the train/test split is chosen)
TORCHVISION_SETS = {
    "cifar10": (datasets.CIFAR10, 3, "cifar-10-batches-py", "train"),
    "mnist": (datasets.MNIST, 1, "MNIST/raw", "train"),
    "fashion_mnist": (datasets.FashionMNIST, 1, "FashionMNIST/raw", "train"),
    "svhn": (datasets.SVHN, 3, "train_32x32.mat", "split"),
    "cinic10": (datasets.ImageFolder, 3, "cinic-10", "folder"),
    "imagenet": (datasets.ImageNet, 3, "meta.bin", "imagenet"),
}
NUM_CLASSES = {"imagenet": 1000}  # the others have 10
IMAGENET_TRANSFORM = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), TO_TENSOR])


def check_data_dir(data_dir: str, expected: str, download: bool) -> Path:
    """``data_dir`` as a path, checked before any reading or download: a folder (a file there is no dataset, and
    ``download`` would fail on it too), writable when ``download`` is set (checked now, not after the transfer)."""
    root = Path(expand_path(str(data_dir), "data.data_dir"))
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"data.data_dir={root} is a file, not a folder: set data.data_dir to the folder "
                                 f"that holds {expected} (a download cannot go into a file either)")
    if download:
        check_writable(root, "data.data_dir")
    return root


def open_torchvision_split(name: str, data_dir: str, train: bool, download: bool) -> Dataset:
    """One split of a torchvision dataset with images as [0, 1] tensors; a clear error if the files are missing."""
    if name not in TORCHVISION_SETS:
        raise ValueError(f"data.name={name!r}: use one of {sorted(TORCHVISION_SETS)}")
    cls, _, expected, split_kind = TORCHVISION_SETS[name]
    root = check_data_dir(data_dir, expected, download)
    if split_kind == "folder":
        folder = root / expected / ("train" if train else "test")
        if not folder.is_dir():
            raise FileNotFoundError(f"data_dir {root} has no CINIC-10 folder {folder}; CINIC-10 is not downloadable "
                                    "through torchvision: unpack it there or set data.data_dir")
        return cls(str(folder), transform=TO_TENSOR)
    if split_kind == "imagenet":
        if not (root / expected).is_file() or not (root / ("train" if train else "val")).is_dir():
            raise FileNotFoundError(f"data_dir {root} has no ImageNet meta.bin and {'train' if train else 'val'}/ "
                                    "folder: let torchvision.datasets.ImageNet unpack the official archives there once, "
                                    "or set data.data_dir")
        return cls(str(root), split="train" if train else "val", transform=IMAGENET_TRANSFORM)
    split = {"split": "train" if train else "test"} if split_kind == "split" else {"train": train}
    try:
        return cls(str(root), download=download, transform=TO_TENSOR, **split)
    except RuntimeError as error:
        damaged = damaged_file(name, root, train)
        if damaged is not None:
            raise CorruptFileError(f"{damaged} is corrupt or truncated ({error}): delete it and pass "
                                   f"data.download=true to fetch it again (a download skips files that exist), or "
                                   f"replace it") from error
        raise FileNotFoundError(f"data_dir {root} has no readable {name} files (expected {root / expected}): "
                                f"pass data.download=true or set data.data_dir ({error})") from error


IDX_ITEM_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}  # idx type code → bytes per value


def damaged_file(name: str, root: Path, train: bool) -> Path | None:
    """The first file of a split that is present but damaged, else None: an MNIST/Fashion-MNIST idx file whose
    size disagrees with its header (truncated), or a CIFAR-10 batch / SVHN ``.mat`` whose md5 differs from the one
    torchvision records for the real file (torchvision itself only says "not found or corrupted")."""
    cls, _, expected, _ = TORCHVISION_SETS[name]
    if name in ("mnist", "fashion_mnist"):
        prefix = "train" if train else "t10k"
        paths = [root / expected / f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
        return next((path for path in paths if path.is_file() and not idx_complete(path)), None)
    if name == "cifar10":
        files = [*(cls.train_list if train else cls.test_list), [cls.meta["filename"], cls.meta["md5"]]]
        checked = [(root / expected / file, md5) for file, md5 in files]
    elif name == "svhn":
        _, file, md5 = cls.split_list["train" if train else "test"]
        checked = [(root / file, md5)]
    else:
        return None
    return next((path for path, md5 in checked if path.is_file() and not check_integrity(str(path), md5)), None)


def idx_complete(path: Path) -> bool:
    """Whether an idx file (magic: 0, 0, type code, rank; then one big-endian uint32 per dimension; then the values)
    holds exactly as many bytes as its header announces."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if len(magic) < 4 or magic[2] not in IDX_ITEM_BYTES:
            return False
        dims = np.frombuffer(handle.read(4 * magic[3]), dtype=">u4")
    if len(dims) < magic[3]:
        return False
    return path.stat().st_size == 4 + 4 * magic[3] + int(np.prod(dims, dtype=np.int64)) * IDX_ITEM_BYTES[magic[2]]


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Class labels of a torchvision dataset without decoding its images."""
    for attribute in ("targets", "labels"):
        if hasattr(dataset, attribute):
            return np.asarray(getattr(dataset, attribute))
    raise TypeError(f"{type(dataset).__name__} exposes no targets/labels")


class TorchvisionDataModule(ImageDataModule):
    """A torchvision classification dataset as a DataModule of [0, 1] images."""

    num_classes = 10

    def __init__(self, name: str = "cifar10", data_dir: str = "data", download: bool = False,
                 val_size: int = 5000, **loader_kwargs):
        super().__init__(**loader_kwargs)
        if name not in TORCHVISION_SETS:
            raise ValueError(f"data.name={name!r}: use one of {sorted(TORCHVISION_SETS)}")
        self.name, self.data_dir, self.download, self.val_size = name, data_dir, download, val_size
        self.in_chans = TORCHVISION_SETS[name][1]
        self.num_classes = NUM_CLASSES.get(name, 10)

    @property
    def source_dataset(self) -> str:
        return f"{type(self).__name__}:{self.name}"

    def prepare_data(self) -> None:
        if self.download:
            open_torchvision_split(self.name, self.data_dir, True, True)
            open_torchvision_split(self.name, self.data_dir, False, True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        full_train = open_torchvision_split(self.name, self.data_dir, True, False)
        self.test_dataset = open_torchvision_split(self.name, self.data_dir, False, False)
        for split, dataset in (("train", full_train), ("test", self.test_dataset)):
            check_labels(dataset_labels(dataset), self.num_classes, f"{self.name} {split} split in {self.data_dir}",
                         "its label file is damaged or belongs to another dataset; delete the files and pass "
                         "data.download=true, or set data.name / data.data_dir to the right dataset")
        if self.name == "cinic10":
            self.train_dataset = full_train
            self.val_dataset = datasets.ImageFolder(str(Path(self.data_dir) / "cinic-10" / "valid"),
                                                    transform=TO_TENSOR)
            return
        order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(self.seed)).numpy()
        val_size = min(self.val_size, len(full_train) // 5)
        self.val_dataset = Subset(full_train, np.sort(order[:val_size]).tolist())
        self.train_dataset = Subset(full_train, np.sort(order[val_size:]).tolist())
