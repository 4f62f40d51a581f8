"""Separating a split's random augmentation from its deterministic transform (``callbacks/augmentation.py``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, random_split
from torchvision import transforms

from lit_robust.callbacks.augmentation import separate_augmentation

MEAN, STD = (0.5,), (0.25,)


class Digits(Dataset):
    """PIL digits through ``transform``, as torchvision's MNIST gives them; ``noise`` adds randomness outside it."""

    def __init__(self, transform, noise: float = 0.0, count: int = 6):
        pixels = np.zeros((count, 12, 12), dtype=np.uint8)
        pixels[:, 3:9, 5:7] = 255  # a vertical stroke: any rotation or shift moves it
        self.pixels, self.transform, self.noise = pixels, transform, noise

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        image = self.transform(Image.fromarray(self.pixels[index], mode="L"))
        return (image + self.noise * torch.rand(image.shape) if self.noise else image), index


def image_of(item):
    return item[0]


def test_a_random_affine_before_to_tensor_is_cut_after_to_tensor_behind_random_split():
    """RandomAffine → ToTensor → Normalize behind random_split: ToTensor runs before the defence (un-augmented [0, 1]
    tensors), RandomAffine then Normalize on every read; the dataset's own transform is left as it was."""
    transform = transforms.Compose([transforms.RandomAffine(20, translate=(0.2, 0.2)), transforms.ToTensor(),
                                    transforms.Normalize(MEAN, STD)])
    digits = Digits(transform)
    train, _ = random_split(digits, [4, 2], generator=torch.Generator().manual_seed(0))
    separated = separate_augmentation(train, image_of, "EBMPurification")
    assert separated.owner is digits and separated.normalizes_after
    assert [type(s).__name__ for s in separated.deterministic.steps] == ["ToTensor"]
    assert [type(s).__name__ for s in separated.augment.steps] == ["RandomAffine", "Normalize"]
    with separated.unaugmented():
        first, again = train[0][0], train[0][0]
    stroke = transforms.ToTensor()(Image.fromarray(digits.pixels[train.indices[0]], mode="L"))
    assert torch.equal(first, again) and torch.equal(first, stroke)
    assert digits.transform is transform
    torch.manual_seed(0)  # on a small digit two draws can coincide; seeded, the count of distinct ones is fixed
    draws = torch.stack([separated.augment(stroke) for _ in range(6)])
    assert len({draw.numpy().tobytes() for draw in draws}) >= 5  # a new draw each time (a frozen one: 1)
    assert draws.min() < 0  # normalised after the random step


def test_a_deterministic_split_has_nothing_to_separate_and_draws_nothing():
    digits = Digits(transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert separate_augmentation(digits, image_of, "EBMPurification") is None
    assert torch.equal(torch.rand(3), expected)  # probing read items without moving the user's generator


def test_a_flip_that_read_the_same_twice_is_still_separated_by_its_class():
    digits = Digits(transforms.Compose([transforms.ToTensor(), transforms.RandomHorizontalFlip(p=0.0)]))
    separated = separate_augmentation(digits, image_of, "EBMPurification")
    assert [type(s).__name__ for s in separated.augment.steps] == ["RandomHorizontalFlip"]
    assert not separated.normalizes_after


class NoisyToTensor:
    def __call__(self, image):
        return transforms.ToTensor()(image) + 0.1 * torch.rand(1)


@pytest.mark.parametrize("digits, fix", [
    (Digits(NoisyToTensor()), r"\(the steps before the first random one \(identity\) give a Image\)"),
    (Digits(transforms.ToTensor(), noise=0.1), "randomness is outside the transform"),
    (Digits(transforms.Compose([transforms.RandomApply([transforms.Lambda(lambda image: image.rotate(30))]),
                                transforms.ToTensor()])), "RandomApply fails on tensors"),  # a PIL-only step
])
def test_augmentation_that_cannot_be_separated_is_refused_naming_the_compose_to_write(digits, fix):
    with pytest.raises(ValueError, match=fix) as refusal:
        separate_augmentation(digits, image_of, "EBMPurification")
    assert "transforms.Compose" in str(refusal.value) and "EBMPurification" in str(refusal.value)


def test_augmentation_without_a_transform_attribute_is_refused():
    class Noisy(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(1, 4, 4), 0

    with pytest.raises(ValueError, match="no dataset in it has a `transform`"):
        separate_augmentation(Noisy(), image_of, "EBMPurification")
