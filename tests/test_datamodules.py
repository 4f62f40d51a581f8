"""DataModules: embedded digits, the unpadded DDP eval sampler, and torchvision loaders on tiny real-format files."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from dataset_trees import (patch_fixed_md5_checks, write_cifar10, write_cinic10, write_imagenet, write_mnist,
                           write_svhn)

from lit_robust.datamodules import DigitsDataModule, TorchvisionDataModule

CPU = torch.device("cpu")


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


def test_num_images_keeps_a_class_balanced_subset_fixed_by_seed():
    dm = DigitsDataModule(source="mnist5k", num_images=100, seed=3)
    dm.setup()
    labels = torch.cat([dm.train_dataset.targets, dm.val_dataset.targets, dm.test_dataset.targets])
    assert torch.bincount(labels).tolist() == [10] * 10
    again = DigitsDataModule(source="mnist5k", num_images=100, seed=3)
    again.setup()
    assert torch.equal(again.test_dataset.images, dm.test_dataset.images)
    with pytest.raises(ValueError, match="num_images=5"):
        DigitsDataModule(num_images=5)


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
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=SimpleNamespace(root_device=CPU))
        seen += list(iter(dm.val_dataloader().sampler))
    assert sorted(seen) == list(range(len(dm.val_dataset)))


def test_loaders_pin_memory_only_for_a_gpu_trainer():
    dm = DigitsDataModule(source="sklearn8x8")
    dm.setup()
    pinned = {}
    for device in ("cpu", "cuda"):
        dm.trainer = SimpleNamespace(world_size=1, global_rank=0,
                                     strategy=SimpleNamespace(root_device=torch.device(device)))
        pinned[device] = [loader.pin_memory for loader in (dm.train_dataloader(), dm.test_dataloader())]
    assert pinned == {"cpu": [False, False], "cuda": [True, True]}


# --- torchvision loaders on tiny files in the real on-disk formats (tests/dataset_trees.py) ----------------------

def test_cifar10_reads_pickle_batches(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path)
    patch_fixed_md5_checks(monkeypatch)  # torchvision checks the real files' md5s
    dm = TorchvisionDataModule(name="cifar10", data_dir=str(tmp_path), val_size=4)
    dm.setup()
    assert len(dm.test_dataset) == 4 and len(dm.train_dataset) + len(dm.val_dataset) == 20
    image, label = dm.test_dataset[0]
    data, labels = written["test_batch"]
    expected = torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(image, expected) and label == labels[0]


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_formats_read_idx_files(tmp_path, name, folder):
    images = write_mnist(tmp_path, folder)
    dm = TorchvisionDataModule(name=name, data_dir=str(tmp_path), val_size=1)
    dm.setup()
    image, _ = dm.test_dataset[2]
    assert image.shape == (1, 28, 28)
    assert torch.allclose(image[0], torch.from_numpy(images["t10k"][2]).float() / 255)


def test_svhn_reads_mat_files(tmp_path, monkeypatch):
    write_svhn(tmp_path)
    patch_fixed_md5_checks(monkeypatch)  # torchvision checks the real files' md5s
    dm = TorchvisionDataModule(name="svhn", data_dir=str(tmp_path), val_size=1)
    dm.setup()
    image, label = dm.test_dataset[0]
    assert image.shape == (3, 32, 32) and 0 <= label <= 9


def test_cinic10_reads_image_folders(tmp_path):
    write_cinic10(tmp_path)
    dm = TorchvisionDataModule(name="cinic10", data_dir=str(tmp_path))
    dm.setup()
    assert len(dm.train_dataset) == len(dm.val_dataset) == len(dm.test_dataset) == 2
    assert torch.allclose(dm.test_dataset[0][0], torch.full((3, 32, 32), 200 / 255))


def test_imagenet_reads_torchvisions_layout(tmp_path):
    write_imagenet(tmp_path)
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
