"""``ControlledScenesDataModule``: the digits of any ``ImageDataModule`` rendered as controlled scenes
(:mod:`lit_robust.functional.scene_controls`) — each digit once, at control values and a background drawn at
random from the lists given, on crops of the training photographs only — with an optional planted cue: class c's
stroke wears ``cue_textures[c]`` with probability ``cue_strength`` (else a texture drawn from ``textures``).

The splits ``train_dataset`` / ``val_dataset`` / ``test_dataset`` are such scenes; ``digits_test`` is the base's
plain test digits, the shapes that :class:`~lit_robust.callbacks.ControlledVariationReport` renders on its grid of
controls and held-out backgrounds (``split: digits_test``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from lit_robust.datamodules.base import ImageDataModule
from lit_robust.datamodules.wrapper import WrappedDataModule
from lit_robust.datasets import TRAINING_BACKGROUNDS, TensorImageDataset, photo_backgrounds, stack_dataset
from lit_robust.functional.scene_controls import NO_CORRUPTION, TEXTURES, SceneControls, check_cue_textures


class ControlledScenesDataModule(WrappedDataModule):
    """Wrap ``base`` (never edited) into scenes of its digits.

    Args:
        backgrounds: the scikit-image photographs whose crops are the training backgrounds (keep the report's
            sweep photographs out of it: those are the held-out backgrounds).
        crops_per_photo: fixed crops of each photograph.
        rotations, scales, textures, corruptions, severity: the values drawn per scene
            (:class:`~lit_robust.functional.scene_controls.SceneControls`).
        cue_textures: class c → its texture (one per class, all different).
        cue_strength: probability that a scene wears its class's texture (0: no cue; the planted cue: 0.9).
    """

    def __init__(self, base: ImageDataModule, backgrounds: Sequence[str] = TRAINING_BACKGROUNDS,
                 crops_per_photo: int = 16, rotations: Sequence[float] = (-30, -15, 0, 15, 30),
                 scales: Sequence[float] = (0.8, 0.9, 1.0), textures: Sequence[str] = tuple(TEXTURES),
                 corruptions: Sequence[str] = (NO_CORRUPTION,), severity: int = 3,
                 cue_textures: Sequence[str] = tuple(TEXTURES), cue_strength: float = 0.0, seed: int | None = None):
        super().__init__(base, seed)
        if not 0.0 <= cue_strength <= 1.0:
            raise ValueError(f"cue_strength={cue_strength}: a probability in [0, 1] (0: no cue, 0.9: the planted cue)")
        self.controls = SceneControls(rotations, scales, [*textures, *cue_textures], corruptions, severity)
        check_cue_textures(cue_textures, self.num_classes)
        self.backgrounds, self.crops_per_photo = list(backgrounds), crops_per_photo
        self.texture_count, self.cue_strength = len(textures), cue_strength
        self.digits_test: Dataset | None = None

    @property
    def source_dataset(self) -> str:
        return f"{type(self).__name__}:{self.base.source_dataset}"

    def _scenes(self, dataset: Dataset, backgrounds: torch.Tensor, salt: int) -> TensorImageDataset:
        """Each digit of ``dataset`` rendered once, its control values and background drawn by a seeded generator."""
        digits, labels = stack_dataset(dataset)
        generator = torch.Generator().manual_seed(int(self.seed) * 1000 + salt)
        count = len(labels)
        rotation, scale, _, corruption = (torch.randint(size, (count,), generator=generator)
                                          for size in self.controls.sizes)
        texture = torch.randint(self.texture_count, (count,), generator=generator)
        cued = torch.rand(count, generator=generator) < self.cue_strength
        texture = torch.where(cued, self.texture_count + labels, texture)  # cue textures follow the free ones
        background = torch.randint(len(backgrounds), (count,), generator=generator)
        factors = torch.stack([rotation, scale, texture, corruption, background], 1)
        return TensorImageDataset(self.controls.render(digits, backgrounds, factors, generator), labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.base.setup(stage)
        side = self.base.test_dataset[0][0].shape[-1]
        backgrounds, _ = photo_backgrounds(self.backgrounds, self.crops_per_photo, side, int(self.seed))
        self.train_dataset = self._scenes(self.base.train_dataset, backgrounds, 1)
        self.val_dataset = self._scenes(self.base.val_dataset, backgrounds, 2)
        self.test_dataset = self._scenes(self.base.test_dataset, backgrounds, 3)
        self.digits_test = self.base.test_dataset
