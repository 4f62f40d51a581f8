"""DataModules: embedded digits, the unpadded DDP eval sampler, and torchvision loaders on tiny real-format files."""
from __future__ import annotations

import pickle
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import cifar, svhn

from lit_robust.datamodules import DigitsDataModule, TorchvisionDataModule


def test_mnist5k_split_is_stratified_fixed_and_in_unit_range():
    dm = DigitsDataModule(source="mnist5k", seed=3)
    dm.setup()
    sizes = [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)]
    assert sizes == [3500, 500, 1000]
    assert torch.bincount(dm.test_dataset.targets).tolist() == [100] * 10
    images = dm.train_dataset.images
    assert images.shape[1:] == (1, 28, 28) and images.min() >= 0 and images.max() <= 1
    again = DigitsDataModule(source="mnist5k", seed=3)
    again.setup()
    assert torch.equal(again.test_dataset.images, dm.test_dataset.images)
    other = DigitsDataModule(source="mnist5k", seed=4)
    other.setup()
    assert not torch.equal(other.test_dataset.images, dm.test_dataset.images)


def test_sklearn8x8_resized_to_16():
    dm = DigitsDataModule(source="sklearn8x8", img_size=16)
    dm.setup()
    assert dm.train_dataset.images.shape[1:] == (1, 16, 16)
    assert sum(len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)) == 1797


def test_unknown_source_names_the_choices():
    with pytest.raises(ValueError, match="mnist5k"):
        DigitsDataModule(source="mnist60k")


def test_ddp_eval_loaders_cover_every_sample_exactly_once():
    dm = DigitsDataModule(source="sklearn8x8", eval_batch_size=64)
    dm.setup()
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        seen += list(iter(dm.val_dataloader().sampler))
    assert sorted(seen) == list(range(len(dm.val_dataset)))


# --- torchvision loaders on tiny files in the real on-disk formats -------------------------------------------------

def _write_cifar10(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "labels": labels}, handle, protocol=2)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, handle, protocol=2)
    return written


def _write_idx(path, array):
    magic = {3: 0x0803, 1: 0x0801}[array.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root, folder_name, n=6):
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = {}
    for split in ("train", "t10k"):
        imgs = rng.integers(0, 256, (n, 28, 28))
        _write_idx(raw / f"{split}-images-idx3-ubyte", imgs)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
        images[split] = imgs
    return images


def test_cifar10_reads_pickle_batches(tmp_path, monkeypatch):
    written = _write_cifar10(tmp_path)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # tiny files have other md5s
    dm = TorchvisionDataModule(name="cifar10", data_dir=str(tmp_path), val_size=4)
    dm.setup()
    assert len(dm.test_dataset) == 4 and len(dm.train_dataset) + len(dm.val_dataset) == 20
    image, label = dm.test_dataset[0]
    data, labels = written["test_batch"]
    expected = torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(image, expected) and label == labels[0]


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_formats_read_idx_files(tmp_path, name, folder):
    images = _write_mnist(tmp_path, folder)
    dm = TorchvisionDataModule(name=name, data_dir=str(tmp_path), val_size=1)
    dm.setup()
    image, _ = dm.test_dataset[2]
    assert image.shape == (1, 28, 28)
    assert torch.allclose(image[0], torch.from_numpy(images["t10k"][2]).float() / 255)


def test_svhn_reads_mat_files(tmp_path, monkeypatch):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, 5)).astype(np.uint8),
                                                   "y": rng.integers(1, 11, (5, 1)).astype(np.uint8)})
    monkeypatch.setattr(svhn, "check_integrity", lambda *args, **kwargs: True)
    dm = TorchvisionDataModule(name="svhn", data_dir=str(tmp_path), val_size=1)
    dm.setup()
    image, label = dm.test_dataset[0]
    assert image.shape == (3, 32, 32) and 0 <= label <= 9


def test_cinic10_reads_image_folders(tmp_path):
    for split in ("train", "valid", "test"):
        for cls in ("airplane", "cat"):
            folder = tmp_path / "cinic-10" / split / cls
            folder.mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(folder / "a.png")
    dm = TorchvisionDataModule(name="cinic10", data_dir=str(tmp_path))
    dm.setup()
    assert len(dm.train_dataset) == len(dm.val_dataset) == len(dm.test_dataset) == 2
    assert torch.allclose(dm.test_dataset[0][0], torch.full((3, 32, 32), 200 / 255))


def test_imagenet_reads_torchvisions_layout(tmp_path):
    wnids = ["n01440764", "n01443537"]
    torch.save(({w: (f"class {i}",) for i, w in enumerate(wnids)}, wnids), tmp_path / "meta.bin")
    for split in ("train", "val"):
        for wnid in wnids:
            (tmp_path / split / wnid).mkdir(parents=True)
            Image.fromarray(np.full((300, 400, 3), 100, np.uint8)).save(tmp_path / split / wnid / "a.JPEG")
    dm = TorchvisionDataModule(name="imagenet", data_dir=str(tmp_path), val_size=1)
    dm.setup()
    image, label = dm.test_dataset[1]
    assert dm.num_classes == 1000 and len(dm.test_dataset) == 2 and len(dm.train_dataset) + len(dm.val_dataset) == 2
    assert image.shape == (3, 224, 224) and label == 1
    assert abs(image.mean().item() - 100 / 255) < 0.02  # JPEG


@pytest.mark.parametrize("name", ["cifar10", "mnist", "svhn", "cinic10", "imagenet"])
def test_missing_dataset_names_the_path_and_the_fix(tmp_path, name):
    dm = TorchvisionDataModule(name=name, data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere") as error:
        dm.setup()
    assert "data_dir" in str(error.value)
