"""Tiny datasets written in each torchvision class's real on-disk format, for tests that read them through the real
classes (``tests/test_datamodules.py``, the all-experiments smoke test).

Integrity checks: MNIST/Fashion-MNIST, CINIC-10 (ImageFolder) and ImageNet (``meta.bin`` + folders) read these
files with no checksum, so nothing is patched for them. CIFAR-10 and SVHN compare every file with the fixed md5 of
the *real* archive's file, which no tiny file can match: ``patch_fixed_md5_checks`` turns off exactly those two
checks, and the files are still parsed by torchvision's own readers (pickle batches, ``.mat``).
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_WNIDS = ("n01440764", "n01443537")


def write_cifar10(root: Path, per_batch: int = 4) -> dict:
    """``cifar-10-batches-py`` with five train batches and a test batch of ``per_batch`` images each (labels
    cycling through the 10 classes, shuffled); returns ``{batch name: (data, labels)}``."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.permutation(np.arange(per_batch) % 10).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "labels": labels}, handle, protocol=2)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, handle, protocol=2)
    return written


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (MNIST's format): big-endian magic for unsigned bytes and the array's rank, the shape, the bytes."""
    magic = {3: 0x0803, 1: 0x0801}[array.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    Path(path).write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder_name: str = "MNIST", n: int = 6, max_label: int = 9) -> dict:
    """``<folder_name>/raw`` idx files (MNIST, FashionMNIST) with ``n`` train and ``n`` test images; returns the
    images by split (``train``, ``t10k``). ``max_label`` above 9: the last label is that (a damaged label file)."""
    raw = Path(root) / folder_name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = {}
    for split in ("train", "t10k"):
        imgs = rng.integers(0, 256, (n, 28, 28))
        write_idx(raw / f"{split}-images-idx3-ubyte", imgs)
        labels = rng.permutation(np.arange(n) % 10)
        labels[-1] = max(labels[-1], max_label)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        images[split] = imgs
    return images


def write_svhn(root: Path, n: int = 5) -> None:
    """``train_32x32.mat`` and ``test_32x32.mat`` (X: 32×32×3×N uint8, y: N×1 labels 1…10, 10 meaning 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        savemat(Path(root) / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8),
                                                     "y": (rng.permutation(np.arange(n) % 10) + 1)[:, None].astype(np.uint8)})


def write_image_folder(folder: Path, classes=("airplane", "cat"), per_class: int = 1, size: int = 32,
                       value: int = 200) -> None:
    """An ImageFolder tree ``folder/<class>/<i>.png`` of constant ``value`` RGB images."""
    for cls in classes:
        (Path(folder) / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(Path(folder) / cls / f"{i}.png")


def write_cinic10(root: Path, per_class: int = 1) -> None:
    """``cinic-10/{train,valid,test}/<class>/*.png`` (CINIC-10 ships as these folders)."""
    for split in ("train", "valid", "test"):
        write_image_folder(Path(root) / "cinic-10" / split, per_class=per_class)


def write_imagenet(root: Path, per_class: int = 1, size: tuple[int, int] = (300, 400),
                   val_per_class: int | None = None) -> None:
    """torchvision's ImageNet layout: ``meta.bin`` ((wnid → class names), val wnids) + ``{train,val}/<wnid>/*.JPEG``
    (what ``torchvision.datasets.ImageNet`` leaves after unpacking the official archives)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(({w: (f"class {i}",) for i, w in enumerate(IMAGENET_WNIDS)}, list(IMAGENET_WNIDS)), root / "meta.bin")
    for split in ("train", "val"):
        for wnid in IMAGENET_WNIDS:
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class if split == "train" or val_per_class is None else val_per_class):
                Image.fromarray(np.full((*size, 3), 100, np.uint8)).save(root / split / wnid / f"{i}.JPEG")


def patch_fixed_md5_checks(monkeypatch) -> None:
    """CIFAR-10 and SVHN check each file against the md5 of the real archive's file; a tiny file cannot match it."""
    from torchvision.datasets import cifar, svhn

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(svhn, "check_integrity", lambda *args, **kwargs: True)


def truncate(path: Path, drop: int = 100) -> None:
    """Cut the last ``drop`` bytes off a file (an interrupted download or copy)."""
    Path(path).write_bytes(Path(path).read_bytes()[:-drop])
