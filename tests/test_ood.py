import pytest
import torch

from lit_robust.datamodules import OODPairDataModule
from lit_robust.datamodules.ood import match_channels, natural_image_crops, synthetic_images


def test_natural_crops_are_fixed_by_seed_and_look_natural():
    a, b, c = natural_image_crops(20, 16, 0), natural_image_crops(20, 16, 0), natural_image_crops(20, 16, 1)
    assert a.shape == (20, 1, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert a.flatten(1).std(1).mean() > 0.03  # textured crops, not flat patches


def test_synthetic_sources():
    noise = synthetic_images("noise", 10, 8, 3, seed=0)
    constant = synthetic_images("constant", 10, 8, 1, seed=0)
    assert noise.shape == (10, 3, 8, 8) and abs(noise.mean().item() - 0.5) < 0.05
    assert (constant.flatten(1).std(1) == 0).all() and constant.flatten(1)[:, 0].unique().numel() == 10
    assert match_channels(constant, 3).shape == (10, 3, 8, 8)


@pytest.mark.parametrize("inlier,outlier", [("sklearn_digits", "natural"), ("natural", "sklearn_digits"),
                                            ("sklearn_digits", "constant")])
def test_pair_splits_and_ood_set(inlier, outlier):
    dm = OODPairDataModule(inlier=inlier, outlier=outlier, img_size=16, num_images=400, seed=3)
    dm.setup()
    n_train, n_val, n_test = len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)
    assert n_train + n_val + n_test == 400
    assert len(dm.ood_test_dataset) == n_test
    image, _ = dm.ood_test_dataset[0]
    assert image.shape == dm.train_dataset[0][0].shape == (1, 16, 16)
    again = OODPairDataModule(inlier=inlier, outlier=outlier, img_size=16, num_images=400, seed=3)
    again.setup()
    assert torch.equal(again.ood_test_dataset.images, dm.ood_test_dataset.images)
    assert torch.equal(again.train_dataset.images, dm.train_dataset.images)


def test_bad_sources_are_named():
    with pytest.raises(ValueError, match="data.outlier='kmnist'"):
        OODPairDataModule(inlier="digits", outlier="kmnist")
    with pytest.raises(ValueError, match="also an outlier source"):
        OODPairDataModule(inlier="digits", outlier="digits")


def test_missing_torchvision_files_give_a_clear_error(tmp_path):
    dm = OODPairDataModule(inlier="fashion_mnist", outlier="mnist", img_size=None, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        dm.setup()


def test_extra_outliers_are_scored_in_the_same_run():
    dm = OODPairDataModule(inlier="sklearn_digits", outlier="natural", extra_outliers=["noise", "constant"],
                           img_size=8, num_images=200)
    dm.setup()
    assert list(dm.ood_test_datasets) == ["natural", "noise", "constant"]
    assert dm.ood_test_dataset is dm.ood_test_datasets["natural"]
    assert all(len(ds) == len(dm.test_dataset) for ds in dm.ood_test_datasets.values())
