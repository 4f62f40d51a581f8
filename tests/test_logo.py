"""The logo blend (thesis 000 Eq. 7.3): exactly (1 − α)·x + α·logo on the logo's square of the chosen target-class
images, every other pixel and image untouched, α = 0 the identity; served by ``PoisonedDataModule`` as ``logo``."""
import pytest
import torch

from lit_robust.datamodules import DigitsDataModule, PoisonedDataModule
from lit_robust.datasets import stack_dataset
from lit_robust.poisons import ATTACKS
from lit_robust.poisons.logo import copyright_glyph, craft_logo
from test_poisons import _data as random_data  # tests/ is on sys.path under pytest


def _data():
    """120 random 16×16 images of 4 classes (30 each), room for the 12-pixel logo."""
    return random_data(n=120, size=16)


def test_glyph_is_a_ring_around_an_open_c():
    """Written from the drawing, not the code: the 12-pixel © has its outer ring touching the top edge's centre, an
    empty middle, the C's stroke left of centre and its gap right of centre."""
    glyph = copyright_glyph(12)
    assert glyph.shape == (12, 12) and set(glyph.unique().tolist()) == {0.0, 1.0}
    assert glyph[0, 5] == glyph[0, 6] == 1 and glyph[0, 0] == 0          # ring top, empty corner
    assert glyph[5:7, 5:7].sum() == 0                                     # hollow centre
    assert glyph[5, 3] == 1 and glyph[5, 8] == 0                           # the C's left stroke; its open right side
    assert torch.equal(glyph, glyph.flip(0))                               # symmetric about the horizontal axis


@pytest.mark.parametrize("alpha", [0.1, 0.4, 1.0])
def test_blend_is_the_mixing_equation_on_the_chosen_images_only(alpha):
    """Poisoned images = (1 − α)·x + α·glyph on the 12×12 square at (x=3, y=1) and x elsewhere; the chosen
    indices are half of the target class, labels unchanged. Catches α and 1 − α swapped, a blend over the whole
    image, a square at (y, x), and poisons taken from other classes."""
    data = _data()
    p = craft_logo(data, target_class=2, alpha=alpha, fraction=0.5, size=12, position=(3, 1),
                   generator=torch.Generator().manual_seed(0))
    assert len(p.indices) == 15 == len(p.indices.unique()) and (data.train_labels[p.indices] == 2).all()
    assert torch.equal(p.labels, data.train_labels[p.indices])
    clean = data.train_images[p.indices]
    expected = clean.clone()
    expected[:, :, 1:13, 3:15] = (1 - alpha) * clean[:, :, 1:13, 3:15] + alpha * copyright_glyph(12)
    assert torch.allclose(p.images, expected, atol=1e-6)
    assert torch.equal(p.images[:, :, 13:, :], clean[:, :, 13:, :]) and torch.equal(p.images[..., :3], clean[..., :3])


def test_alpha_zero_is_the_identity():
    data = _data()
    p = craft_logo(data, alpha=0.0, generator=torch.Generator().manual_seed(1))
    assert len(p.indices) == 30 and torch.equal(p.images, data.train_images[p.indices])


@pytest.mark.parametrize("params, message", [({"alpha": 1.5}, "alpha=1.5"), ({"alpha": -0.1}, "alpha=-0.1"),
                                             ({"size": 3}, "size 3"), ({"size": 17}, "size 17 does not fit the 16×16"),
                                             ({"position": (10, 0)}, "outside"),
                                             ({"target_class": 9}, "target_class=9")])
def test_bad_parameters_are_refused_naming_the_value(params, message):
    with pytest.raises(ValueError, match=message):
        craft_logo(_data(), **params, generator=torch.Generator())


def test_datamodule_serves_the_logo_on_the_target_class_and_on_the_triggered_test_images(tmp_path):
    """``attack=logo`` through the DataModule: the served train split differs from the clean one exactly at the
    poisoned target-class indices (labels all unchanged), and the triggered test set holds the other classes' test
    images with the same blend — what ``PoisonMetrics`` reports as the logo's success."""
    assert ATTACKS["logo"] is craft_logo
    base = DigitsDataModule(source="mnist5k", num_images=300, batch_size=64, seed=0)
    dm = PoisonedDataModule(base, attack="logo", params={"target_class": 1, "alpha": 0.3, "position": (16, 16)},
                            seed=0, cache_dir=str(tmp_path), progress=False)
    dm.setup()
    clean_images, clean_labels = stack_dataset(base.train_dataset)
    images, labels = stack_dataset(dm.train_dataset)
    changed = (images != clean_images).flatten(1).any(1)
    assert torch.equal(changed, clean_labels == 1) and torch.equal(labels, clean_labels)
    assert torch.equal(changed, dm.poison_mask)
    test_images, test_labels = stack_dataset(base.test_dataset)
    triggered = dm.triggered_test_dataset()
    others = test_images[test_labels != 1]
    expected = others.clone()
    expected[:, :, 16:28, 16:28] = 0.7 * others[:, :, 16:28, 16:28] + 0.3 * copyright_glyph(12)
    assert torch.equal(triggered.targets, test_labels[test_labels != 1])
    assert torch.allclose(triggered.images, expected, atol=1e-6)
    assert dm.manifest["trigger"]["alpha"] == 0.3 and dm.manifest["attack"] == "logo"
