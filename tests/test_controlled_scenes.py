"""``ControlledScenesDataModule``: training scenes wear the planted class texture at the asked rate and lie on crops
of the training photographs only, never on the held-out ones."""
from __future__ import annotations

import pytest
import torch

from lit_robust.datamodules import ControlledScenesDataModule, DigitsDataModule
from lit_robust.datasets import HELD_OUT_BACKGROUNDS, TRAINING_BACKGROUNDS, photo_backgrounds, stack_dataset
from lit_robust.functional.scene_controls import TEXTURES, stroke_textures


def upright_scenes(cue_strength: float) -> ControlledScenesDataModule:
    data = ControlledScenesDataModule(DigitsDataModule(num_images=300, seed=0), rotations=(0,), scales=(1,),
                                      crops_per_photo=2, cue_strength=cue_strength)
    data.setup("fit")
    return data


def wears_class_texture(data: ControlledScenesDataModule) -> torch.Tensor:
    """Per training scene: every pixel of the digit at opacity α > 0.95 (8 or more per digit) is within 1 − α of its
    class's cue texture (the other texture value is at least 0.9 away)."""
    digits, labels = stack_dataset(data.base.train_dataset)
    patterns = stroke_textures(list(TEXTURES), 28, 28)[labels][:, None]
    matches = ((data.train_dataset.images - patterns).abs() <= 1 - digits + 1e-5) | (digits <= 0.95)
    return matches.all(-1).all(-1).all(-1)


@pytest.mark.parametrize("cue_strength, low, high", [(0.9, 0.85, 0.97), (0.0, 0.04, 0.17)])
def test_the_planted_cue_puts_the_class_texture_on_the_asked_share_of_training_scenes(cue_strength, low, high):
    """With the cue at 0.9, about 0.9 + 0.1/10 of the 210 training scenes wear their class's texture; without it,
    about 1/10 (a texture drawn at random from the ten). Fails for a cue not planted, planted on every scene, or a
    texture chosen by another rule than the class."""
    share = wears_class_texture(upright_scenes(cue_strength)).float().mean().item()
    assert low < share < high


def test_training_scenes_lie_on_training_photographs_only_and_the_report_digits_are_plain():
    """Every training scene's empty pixels are those of one crop of a training photograph (exactly), and far from
    every crop of the held-out photographs; ``digits_test`` is the base's unrendered test split."""
    data = upright_scenes(0.0)
    digits, _ = stack_dataset(data.base.train_dataset)
    empty = (digits == 0).float()[:, None]
    scenes = data.train_dataset.images[:, None]

    def nearest(crops: torch.Tensor) -> torch.Tensor:
        return ((scenes - crops[None]).abs() * empty).amax((2, 3, 4)).min(1).values

    training, _ = photo_backgrounds(TRAINING_BACKGROUNDS, 2, 28, 0)
    held_out, _ = photo_backgrounds(HELD_OUT_BACKGROUNDS, 2, 28, 0)
    assert nearest(training).max() < 1e-5 and nearest(held_out).min() > 0.02
    assert data.digits_test is data.base.test_dataset


def test_bad_cue_settings_are_refused_naming_them():
    base = DigitsDataModule(num_images=100)
    with pytest.raises(ValueError, match="cue_strength=1.5: a probability"):
        ControlledScenesDataModule(base, cue_strength=1.5)
    with pytest.raises(ValueError, match=r"cue_textures \['solid', 'solid'.*give 10 different textures"):
        ControlledScenesDataModule(base, cue_textures=["solid"] * 10)
