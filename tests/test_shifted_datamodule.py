import pytest
import torch

from lit_robust.datamodules import DigitsDataModule, PendulumDataModule, ShiftedDataModule
from lit_robust.datasets import stack_dataset
from lit_robust.functional.shifts import rotate


def test_train_clean_test_shifted_and_sweep_names():
    dm = ShiftedDataModule(DigitsDataModule(source="sklearn8x8"), test_shift={"name": "rotate", "degrees": 30},
                           sweep=[{"name": "translate", "dy": 2, "label": "vertical_2px"},
                                  {"name": "gaussian_noise", "severity": 2}])
    dm.setup()
    base_train, _ = stack_dataset(dm.base.train_dataset)
    base_test, test_labels = stack_dataset(dm.base.test_dataset)
    assert torch.equal(stack_dataset(dm.train_dataset)[0], base_train)
    images, labels = stack_dataset(dm.test_dataset)
    assert torch.allclose(images, rotate(base_test, 30)) and torch.equal(labels, test_labels)
    sweep = dm.shifted_test_datasets()
    assert list(sweep) == ["vertical_2px", "gaussian_noise_severity2"]
    # seeded noise: the same view twice
    assert torch.equal(stack_dataset(sweep["gaussian_noise_severity2"])[0],
                       stack_dataset(dm.shifted_test_datasets()["gaussian_noise_severity2"])[0])
    assert dm.num_classes == 10 and dm.in_chans == 1


def test_pendulum_intervention_rerenders_and_sets_factor():
    base = PendulumDataModule(img_size=16, sampling="uniform", n_samples=40, test_fraction=0.25)
    dm = ShiftedDataModule(base, test_shift={"name": "intervene", "theta": 60.0})
    dm.setup()
    images, factors = stack_dataset(dm.test_dataset)
    clean_images, clean_factors = stack_dataset(base.test_dataset)
    assert (factors[:, 0] == 60.0).all() and torch.equal(factors[:, 1], clean_factors[:, 1])
    assert not torch.allclose(factors[:, 3], clean_factors[:, 3])  # the shadow follows θ
    assert images.shape == clean_images.shape and not torch.allclose(images, clean_images)


def test_bad_shift_specs_are_named():
    with pytest.raises(ValueError, match="no 'name'"):
        ShiftedDataModule(DigitsDataModule(source="sklearn8x8"), test_shift={"degrees": 3})
    dm = ShiftedDataModule(DigitsDataModule(source="sklearn8x8"), test_shift={"name": "intervene", "theta": 1})
    with pytest.raises(ValueError, match="Pendulum"):
        dm.setup()
    dm = ShiftedDataModule(DigitsDataModule(source="sklearn8x8"), test_shift={"name": "swirl"})
    with pytest.raises(ValueError, match="swirl"):
        dm.setup()
