"""Logo / IP blend (thesis 000 §7.6, Eq. 7.3): x' = (1 − α)·x + α·logo on the logo's square, the rest of x kept.

The thesis pastes a logo into an image and interpolates the two (x_logo equals x outside the logo), to ask whether
PureGen removes visible intellectual property (logos, watermarks) while keeping the classes. Here the logo is a
synthetic © glyph drawn in torch (no download) and, unlike the thesis' random placement per epoch, it sits at one
position on a fraction of one *target* class's training images, labels unchanged: a visible clean-label cue. Its
success is the test images of the other classes with the logo blended in that the classifier calls the target class
(000 Eq. D.5); a purifier that erases the logo from the training set leaves the classifier nothing to learn from it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lit_robust.poisons.badnets import badnets_trigger
from lit_robust.poisons.crafted import CraftingData, Poisons, choose_indices, stamp_trigger


def copyright_glyph(size: int) -> torch.Tensor:
    """A © glyph (size, size) with values in {0, 1}: a ring of radius 0.8 and an open C of radius 0.45 (gap to the
    right), strokes 0.25 wide, in coordinates where the square spans [−1, 1]."""
    if size < 5:
        raise ValueError(f"logo size {size} is too small to draw the glyph; use size ≥ 5 pixels")
    centres = (torch.arange(size) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    radius = (x ** 2 + y ** 2).sqrt()
    ring = (radius - 0.8).abs() <= 0.125
    open_c = ((radius - 0.45).abs() <= 0.125) & (torch.atan2(y, x).abs() >= torch.pi / 4)
    return (ring | open_c).float()


def logo_trigger(image_shape: Sequence[int], alpha: float, size: int = 12, position: Sequence[int] | None = None,
                 generator: torch.Generator | None = None) -> dict:
    """The logo as a stamp trigger: ``mask`` (1, H, W) is α on the logo's square and 0 elsewhere, ``pattern``
    (C, H, W) the glyph on that square, so ``stamp_trigger`` gives (1 − α)·x + α·logo there and x elsewhere.
    ``position`` is the square's top-left (x, y); None draws one uniformly with the whole logo visible."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is not a mixing ratio: use 0 ≤ alpha ≤ 1 (0 leaves the images unchanged)")
    if size > min(image_shape[1:]):
        raise ValueError(f"logo size {size} does not fit the {image_shape[2]}×{image_shape[1]} images: use "
                         f"size ≤ {min(image_shape[1:])}")
    square = badnets_trigger(image_shape, "patch", size, position, 1.0, generator)
    x, y = square["position"]
    pattern = torch.zeros(image_shape)
    pattern[:, y:y + size, x:x + size] = copyright_glyph(size)
    return {"kind": "stamp", "mask": alpha * square["mask"], "pattern": pattern, "position": [x, y],
            "alpha": float(alpha), "size": int(size), "shape": "copyright_glyph"}


def craft_logo(data: CraftingData, *, target_class: int = 0, alpha: float = 0.2, fraction: float = 1.0,
               size: int = 12, position: Sequence[int] | None = None, generator: torch.Generator,
               progress: bool = True) -> Poisons:
    """Blend the logo (Eq. 7.3, mixing ratio ``alpha``) into ``round(fraction × |target class|)`` random training
    images of the target class, labels unchanged. The thesis sweeps α ∈ {0.1, 0.25, 0.4, …} with 16×16 logos on
    64×64 images; at that share of a 28×28 digit (7 pixels) the glyph's two strokes merge, so the default is 12."""
    if not 0 <= target_class < data.num_classes:
        raise ValueError(f"target_class={target_class} is not a class of this data (0..{data.num_classes - 1})")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1] (a fraction of the target class)")
    trigger = logo_trigger(data.train_images.shape[1:], alpha, size, position, generator)
    n_target = int((data.train_labels == target_class).sum())
    indices = choose_indices(data.train_labels, target_class, int(round(fraction * n_target)), generator)
    images = stamp_trigger(data.train_images[indices], trigger["mask"], trigger["pattern"])
    return Poisons(indices=indices, images=images, labels=data.train_labels[indices].clone(),
                   target_class=target_class, trigger=trigger, info={"target_class_size": n_target})
