"""The PureGen extras' configs (thesis 000 §7.4.1 and §7.6): purifiers trained on other data than the digits they
purify get 28×28 grey images in [0, 1] that are not those digits, and the purification configs read the checkpoints
those runs write while keeping the attack of their undefended run."""
from __future__ import annotations

import hydra
import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lit_robust.datasets import stack_dataset


def compose_experiment(name: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", "output_dir=/tmp/lit_robust_test"])


def train_images(name: str) -> torch.Tensor:
    datamodule = hydra.utils.instantiate(compose_experiment(name).data)
    datamodule.setup("fit")
    return stack_dataset(datamodule.train_dataset)[0]


@pytest.fixture(scope="module")
def purified_digits() -> torch.Tensor:
    """The clean training digits of narcissus_digits (the set the purifiers are applied to), flattened."""
    datamodule = hydra.utils.instantiate(compose_experiment("narcissus_digits").data.base)
    datamodule.setup("fit")
    return stack_dataset(datamodule.train_dataset)[0].flatten(1)


@pytest.mark.parametrize("experiment, count", [("ebm_sklearn8x8", 1257), ("ddpm_sklearn8x8", 1257),
                                               ("ebm_natural", 3500)])
def test_other_data_is_28px_grey_in_the_unit_range_and_not_the_purified_digits(experiment, count, purified_digits):
    """70 % of scikit-learn's 1,797 digits upsampled from 8×8, or of 5,000 natural crops; every image's nearest
    purified digit is far away (squared L2 ≥ 5 over 784 pixels; an image of the purified set is at 0). Catches the
    configs left on the embedded MNIST digits, 8×8 images not upsampled, and 0–255 or 0–16 pixel scales."""
    images = train_images(experiment)
    assert images.shape == (count, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.9
    assert torch.cdist(images.flatten(1), purified_digits).min() ** 2 >= 5.0


def test_8x8_digits_are_upsampled_scikit_learn_digits():
    """Each training image is one of scikit-learn's 8×8 digits resized to 28×28 (not another source at 28 px)."""
    from lit_robust.datasets import load_digits_source, resize_images

    images = train_images("ebm_sklearn8x8")
    source = resize_images(load_digits_source("sklearn8x8")[0], 28)
    nearest = torch.cdist(images.flatten(1), source.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    assert nearest.min(1).values.max() < 1e-4


@pytest.mark.parametrize("purifier, trainer", [("pureebm_pood_narcissus_digits", "ebm_sklearn8x8"),
                                               ("pureddpm_pood_narcissus_digits", "ddpm_sklearn8x8"),
                                               ("pureebm_p_narcissus_digits", "ebm_narcissus_all_digits")])
def test_purification_reads_the_trainers_checkpoint_on_the_narcissus_poisons(purifier, trainer):
    cfg = compose_experiment(purifier)
    weights = cfg.callbacks.purification.get("ebm") or cfg.callbacks.purification.ddpm
    assert weights == f"outputs/{trainer}/checkpoints/last.ckpt"
    assert cfg.data == compose_experiment("narcissus_digits").data


@pytest.mark.parametrize("purifier, reference", [("pureebm_logo_digits", "pureebm_narcissus_digits"),
                                                 ("pureddpm_logo_digits", "pureddpm_narcissus_digits")])
def test_logo_purification_is_the_narcissus_purifier_on_the_logo_poisons(purifier, reference):
    """The logo configs restate the purifier block (an experiment cannot inherit two attacks): it must stay equal to
    the Narcissus one, and the data and classifier equal to logo_digits'."""
    cfg, logo = compose_experiment(purifier), compose_experiment("logo_digits")
    assert cfg.callbacks.purification == compose_experiment(reference).callbacks.purification
    assert cfg.data == logo.data and cfg.model == logo.model and cfg.data.attack == "logo"
    assert OmegaConf.select(logo, "callbacks.purification") is None


def test_pureebm_p_trains_on_every_class_poisoned_with_the_narcissus_digits_parameters():
    """Same attack parameters and seed as narcissus_digits, so class 0's trigger is the one PureEBM-P purifies."""
    cfg, attacked = compose_experiment("ebm_narcissus_all_digits"), compose_experiment("narcissus_digits")
    assert cfg.data.attack == "narcissus_all_classes" and cfg.data.params == attacked.data.params
    assert cfg.data.seed == attacked.data.seed and cfg.data.base.source == attacked.data.base.source
