"""Label-preserving trigger planting (Salman 2023 §7.2) and target de-biasing (Fig. 7.4): the planted images carry
the patch where it was asked for and nowhere else, every label is kept, and the stated fraction of the source class
(or, de-biasing, of the whole training set) is planted."""
import pytest
import torch

from lit_robust.datamodules import DigitsDataModule, PoisonedDataModule, RelabelledDataModule
from lit_robust.poisons import CraftingData, craft_planted


def crafting_data(n: int = 60, size: int = 10) -> CraftingData:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, size, size, generator=g) * 0.5  # nothing white, so a planted patch is unmistakable
    labels = torch.arange(n) % 4
    return CraftingData(images, labels, images[:8], labels[:8], num_classes=4)


def test_planted_images_carry_a_white_corner_patch_and_keep_their_labels():
    """Class 2 has 15 images: 0.4 of them (6) are planted, each with a white 3×3 patch in the bottom-right corner
    and every other pixel as it was, and each keeps label 2; the trigger's class is 2. Catches relabelling (BadNets'
    behaviour), a patch elsewhere or of another size, images drawn from other classes and a wrong count."""
    data = crafting_data()
    poisons = craft_planted(data, source_class=2, fraction=0.4, size=3, generator=torch.Generator().manual_seed(1))
    assert len(poisons.indices) == 6 and len(set(poisons.indices.tolist())) == 6
    assert (data.train_labels[poisons.indices] == 2).all()
    assert torch.equal(poisons.labels, torch.full((6,), 2))
    assert poisons.target_class == 2 and poisons.source_class is None   # any class may flip, not only the 7s
    assert (poisons.images[:, :, 7:, 7:] == 1.0).all()
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[7:, 7:] = True
    original = data.train_images[poisons.indices]
    assert torch.equal(poisons.images[:, :, ~mask], original[:, :, ~mask])
    assert poisons.trigger["position"] == [7, 7] and poisons.trigger["value"] == [1.0]


def test_without_a_source_class_the_fraction_is_drawn_from_every_class():
    """De-biasing: 0.5 of all 60 images (30) are planted, from every class, labels kept, and the trigger points at no
    class. Catches a plant restricted to one class and a fraction of the wrong pool."""
    data = crafting_data()
    poisons = craft_planted(data, source_class=None, fraction=0.5, generator=torch.Generator().manual_seed(1))
    assert len(poisons.indices) == 30 and poisons.target_class is None
    assert set(data.train_labels[poisons.indices].tolist()) == {0, 1, 2, 3}
    assert torch.equal(poisons.labels, data.train_labels[poisons.indices])
    assert (poisons.images[:, :, 7:, 7:] == 1.0).all()


@pytest.mark.parametrize("params,message", [(dict(source_class=4), "source_class=4 is not a class of this data"),
                                            (dict(fraction=1.5), "fraction=1.5 must be in"),
                                            (dict(position=(9, 0)), r"trigger position \(9, 0\)")])
def test_bad_planting_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        craft_planted(crafting_data(), generator=torch.Generator().manual_seed(0), **{"source_class": 2, **params})


def test_a_de_biased_target_carries_the_trigger_on_the_stated_fraction(tmp_path):
    """The target of bias transfer (8×8 digits at 28×28, labels mod 5) de-biased at 50 %: exactly round(0.5 × N)
    training images carry the white corner patch — those, and only those (no clean digit fills the corner) —, every
    label is the base digit mod 5, and the test split is clean. Catches a de-biasing fraction off by any image and
    labels changed by the plant."""
    base = DigitsDataModule(source="sklearn8x8", img_size=28)
    target = PoisonedDataModule(RelabelledDataModule(base, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]), attack="planted",
                                params=dict(source_class=None, fraction=0.5), cache_dir=str(tmp_path), progress=False)
    target.setup("fit")
    images, labels = target.train_dataset.images, target.train_dataset.targets
    assert len(labels) == 1257 and int(target.poison_mask.sum()) == round(0.5 * 1257)
    carries = (images[:, 0, 25:, 25:] == 1.0).flatten(1).all(1)
    assert torch.equal(carries, target.poison_mask)
    assert torch.equal(labels, base.train_dataset.targets % 5)
    assert not (target.test_dataset.images[:, 0, 25:, 25:] == 1.0).flatten(1).all(1).any()
