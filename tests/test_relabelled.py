"""``RelabelledDataModule``: the base's images and split, classes mapped through ``label_map``."""
import pytest
import torch

from lit_robust.datamodules import DigitsDataModule, RelabelledDataModule


def test_digits_mod_5_keep_the_images_and_split_of_the_ten_digits():
    """Every split holds the base's images in the base's order with label d mod 5, and the module has 5 classes.
    Catches a map applied to one split only, a reshuffled split and a class count left at 10."""
    base = DigitsDataModule(source="sklearn8x8")
    relabelled = RelabelledDataModule(base, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    relabelled.setup("fit")
    assert relabelled.num_classes == 5
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        ours, theirs = getattr(relabelled, split), getattr(base, split)
        assert torch.equal(ours.images, theirs.images) and torch.equal(ours.targets, theirs.targets % 5)
    assert set(relabelled.train_dataset.targets.tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("label_map,message", [([0, 1], "has 2 entries for the base's 10 classes"),
                                               ([0, 2] * 5, r"uses classes \[0, 2\]: the new classes must be 0..1")])
def test_a_label_map_that_is_not_a_map_onto_0_to_k_is_refused(label_map, message):
    with pytest.raises(ValueError, match=message):
        RelabelledDataModule(DigitsDataModule(source="sklearn8x8"), label_map)
