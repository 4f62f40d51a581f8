"""Controlled scenes of digits, the 2D stand-in for 3DB's rendered controls (Leclerc et al. 2022, "3DB: a framework
for debugging computer vision models"; thesis 001 ch. 6), and the analysis its dashboard gives.

A scene is a digit whose stroke (the digit's grey level read as opacity) is painted with a texture, posed by a
rotation and a scale, composited onto a background photograph and corrupted: ``scene = bg·(1 − α) + paint·α``.
Every control takes its values from a list, so a sweep is a grid (3DB's grid policy) and each scene is the row of
value indices it was rendered from. The analysis: accuracy per control value and per pair of control values (3DB
§6.2.3, Fig. 6.8), per background against the background's complexity — the mean Sobel gradient magnitude, 3DB's
"average pixel value after an edge detection filter" (Fig. 6.7) — and, on cue-conflict scenes (the shape of class a
with the texture of class b, §6.2.2 after Geirhos et al. 2019), the share of predictions that follow the shape, the
texture or neither.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from lit_robust.functional.shifts import COMMON_CORRUPTIONS, corrupt, rotate_and_scale

CONTROLS = ("rotation", "scale", "texture", "corruption")
"""The rendered controls, in the order of a scene's value indices (the background index follows them)."""

# Stroke textures as functions of the pixel row y and column x (integer grids): 1 where the stroke is painted white,
# 0 where black. Ten, so that each of ten classes can carry its own texture (the planted cue).
TEXTURES = {
    "solid": lambda y, x: torch.ones_like(y, dtype=torch.bool),
    "stripes_h": lambda y, x: (y // 2) % 2 == 0,
    "stripes_v": lambda y, x: (x // 2) % 2 == 0,
    "stripes_d": lambda y, x: ((x + y) // 2) % 2 == 0,
    "stripes_a": lambda y, x: ((x - y) // 2) % 2 == 0,
    "stripes_wide": lambda y, x: (y // 4) % 2 == 0,
    "checker": lambda y, x: (x // 2 + y // 2) % 2 == 0,
    "checker_fine": lambda y, x: (x + y) % 2 == 0,
    "grid": lambda y, x: (x % 3 == 0) | (y % 3 == 0),
    "dashes": lambda y, x: ((y // 2) % 2 == 0) & ((x // 3) % 2 == 0),
}
NO_CORRUPTION = "none"


def stroke_textures(names: Sequence[str], height: int, width: int) -> torch.Tensor:
    """The named textures as paint images (T, height, width) of 0s and 1s."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([TEXTURES[name](y, x).float() for name in names])


def composite(alpha: torch.Tensor, paint: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The stroke (opacity ``alpha``) painted with ``paint`` over ``background``: bg·(1 − α) + paint·α."""
    return background * (1 - alpha) + paint * alpha


def sobel_complexity(images: torch.Tensor) -> torch.Tensor:
    """Each image's mean Sobel gradient magnitude (N,) over the interior pixels of its channel mean: 0 for a flat
    image, large for a busy one (3DB's background complexity, Fig. 6.7)."""
    gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=images.dtype,
                      device=images.device)
    kernels = torch.stack([gx, gx.T])[:, None]
    gradients = F.conv2d(images.mean(1, keepdim=True), kernels)
    return gradients.pow(2).sum(1).sqrt().mean((1, 2))


def check_controls(rotations: Sequence[float], scales: Sequence[float], textures: Sequence[str],
                   corruptions: Sequence[str], severity: int) -> None:
    """Refuse control values the renderer does not have, naming the bad value and the choices."""
    for name, values in zip(CONTROLS, (rotations, scales, textures, corruptions)):
        if len(values) == 0:
            raise ValueError(f"the {name} control has no values: give at least one")
    if min(scales) <= 0:
        raise ValueError(f"scale {min(scales)}: scales magnify the digit and must be positive (1: as drawn)")
    unknown = [name for name in textures if name not in TEXTURES]
    if unknown:
        raise ValueError(f"textures {unknown}: use names from {sorted(TEXTURES)}")
    unknown = [name for name in corruptions if name != NO_CORRUPTION and name not in COMMON_CORRUPTIONS]
    if unknown:
        raise ValueError(f"corruptions {unknown}: use {NO_CORRUPTION!r} or names from {sorted(COMMON_CORRUPTIONS)}")
    if severity not in range(1, 6):
        raise ValueError(f"severity={severity}: use an integer from 1 to 5 (the common corruptions' scale)")


def check_cue_textures(cue_textures: Sequence[str], num_classes: int) -> None:
    """One texture per class, all different, so that a texture names one class."""
    if len(cue_textures) < num_classes or len(set(cue_textures)) < len(cue_textures):
        raise ValueError(f"cue_textures {list(cue_textures)}: give {num_classes} different textures, one per class "
                         f"(names from {sorted(TEXTURES)})")


class SceneControls:
    """The values of each control and the renderer of scenes given, per scene, the index of each control's value
    and of its background."""

    def __init__(self, rotations: Sequence[float], scales: Sequence[float], textures: Sequence[str],
                 corruptions: Sequence[str] = (NO_CORRUPTION,), severity: int = 3):
        check_controls(rotations, scales, textures, corruptions, severity)
        self.values = {"rotation": [float(v) for v in rotations], "scale": [float(v) for v in scales],
                       "texture": list(textures), "corruption": list(corruptions)}
        self.severity = severity

    @property
    def sizes(self) -> list[int]:
        return [len(self.values[name]) for name in CONTROLS]

    def render(self, digits: torch.Tensor, backgrounds: torch.Tensor, factors: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Scenes (N, C, H, W) in [0, 1]: digit i (its channel mean as the stroke's opacity) rotated and scaled,
        painted with its texture over ``backgrounds[factors[i, 4]]`` (grey, (B, 1, H, W)) and corrupted, at
        ``factors[i, :4]`` (indices into the rotation, scale, texture and corruption values); noise draws come from
        ``generator``."""
        factors = factors.long().cpu()
        height, width = digits.shape[-2:]
        degrees = torch.tensor(self.values["rotation"])[factors[:, 0]]
        scales = torch.tensor(self.values["scale"])[factors[:, 1]]
        alpha = rotate_and_scale(digits.mean(1, keepdim=True), degrees, scales)
        paint = stroke_textures(self.values["texture"], height, width).to(digits.device)[factors[:, 2], None]
        scenes = composite(alpha, paint, backgrounds.to(digits.device)[factors[:, 4]])
        for index, name in enumerate(self.values["corruption"]):
            chosen = factors[:, 3] == index
            if name != NO_CORRUPTION and chosen.any():
                scenes[chosen.to(scenes.device)] = corrupt(scenes[chosen.to(scenes.device)], name, self.severity,
                                                           generator)
        return scenes.expand(-1, digits.shape[1], -1, -1)


def control_grid(sizes: Sequence[int]) -> torch.Tensor:
    """Every combination of value indices (prod(sizes), len(sizes)), the last column varying fastest: 3DB's grid
    search policy."""
    return torch.cartesian_prod(*[torch.arange(size) for size in sizes]).reshape(-1, len(sizes))


def grouped_accuracy(correct: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """Accuracy (count,) of the predictions in each group ``0 … count − 1`` (NaN for a group without scenes)."""
    hits = torch.bincount(groups, weights=correct.double(), minlength=count)
    return hits / torch.bincount(groups, minlength=count).double()


def pairwise_accuracy(correct: torch.Tensor, first: torch.Tensor, second: torch.Tensor, first_count: int,
                      second_count: int) -> torch.Tensor:
    """Accuracy (first_count, second_count) of the scenes at each pair of values of two controls."""
    return grouped_accuracy(correct, first * second_count + second, first_count * second_count).view(
        first_count, second_count)


def conflicting_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """For scene i of class a, the class b ≠ a whose texture it wears: a + 1 + (i mod (K − 1)), mod K, so every
    other class is used in turn."""
    offsets = 1 + torch.arange(len(labels)) % (num_classes - 1)
    return (labels + offsets) % num_classes


def cue_decisions(predictions: torch.Tensor, shape_classes: torch.Tensor,
                  texture_classes: torch.Tensor) -> dict[str, float]:
    """The share of cue-conflict predictions that name the shape's class, the texture's class, or neither, and the
    shape bias shape / (shape + texture) of Geirhos et al. (NaN when neither cue is followed)."""
    shape = (predictions == shape_classes).double().mean().item()
    texture = (predictions == texture_classes).double().mean().item()
    return {"shape": shape, "texture": texture, "other": 1.0 - shape - texture,
            "shape_bias": shape / (shape + texture) if shape + texture > 0 else float("nan")}
