"""The controlled-scene renderer and the sweep's aggregates (``lit_robust.functional.scene_controls``), on tensors
whose answer is known: a block of full opacity wears exactly the chosen texture over exactly the background, a bar
turns and shrinks as asked, Sobel complexity orders flat < ramp < noise with the ramp's exact value, and the grouped
accuracies and cue decisions equal hand counts."""
from __future__ import annotations

import math

import pytest
import torch

from lit_robust.functional.scene_controls import (TEXTURES, SceneControls, conflicting_classes, control_grid,
                                                  cue_decisions, grouped_accuracy, pairwise_accuracy,
                                                  sobel_complexity, stroke_textures)
from lit_robust.functional.shifts import gaussian_blur


def block_digit(size: int = 16, low: int = 4, high: int = 12) -> torch.Tensor:
    digit = torch.zeros(1, 1, size, size)
    digit[..., low:high, low:high] = 1.0
    return digit


def test_a_stroke_of_full_opacity_wears_exactly_its_texture_over_exactly_the_background():
    """Upright, scale 1, no corruption: inside the block every pixel is the texture's (stripes_h: rows 1, 1, 0, 0, …;
    checker: 2×2 squares), outside every pixel is the background's. Fails for a renderer that ignores the texture,
    paints the background over the stroke, or indexes the wrong texture."""
    names = list(TEXTURES)
    controls = SceneControls((0,), (1,), names)
    digit, background = block_digit(), torch.full((1, 1, 16, 16), 0.3)
    for index, name in enumerate(names):
        scene = controls.render(digit, background, torch.tensor([[0, 0, index, 0, 0]]))[0, 0]
        pattern = stroke_textures([name], 16, 16)[0]
        assert torch.allclose(scene[4:12, 4:12], pattern[4:12, 4:12], atol=1e-5), name
        outside = torch.ones(16, 16, dtype=torch.bool)
        outside[4:12, 4:12] = False
        assert torch.allclose(scene[outside], torch.tensor(0.3), atol=1e-5), name
    stripes = stroke_textures(["stripes_h", "checker"], 16, 16)
    assert stripes[0, :4, 0].tolist() == [1, 1, 0, 0] and stripes[0, :, 5].tolist() == stripes[0, :, 0].tolist()
    assert stripes[1, :4, :4].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def ink_spread(scene: torch.Tensor) -> tuple[float, float, float]:
    """Total ink and its standard deviation along rows and columns."""
    ink = scene[0, 0]
    total = ink.sum()
    rows, columns = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    spread = [((ink * (axis - (ink * axis).sum() / total) ** 2).sum() / total).sqrt().item()
              for axis in (rows, columns)]
    return total.item(), *spread


def test_rotation_turns_and_scale_shrinks_the_stroke():
    """A horizontal bar on black: at 90° its ink spreads along rows instead of columns, at scale 0.5 its spread
    halves and its ink falls to a quarter. Fails for a renderer that ignores the pose, or uses one value for the
    whole batch."""
    bar = torch.zeros(1, 1, 32, 32)
    bar[..., 15:17, 4:28] = 1.0
    controls = SceneControls((0, 90), (1.0, 0.5), ["solid"])
    black = torch.zeros(1, 1, 32, 32)
    factors = torch.tensor([[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    scenes = controls.render(bar.expand(3, -1, -1, -1), black, factors)
    (ink, rows, columns), (_, turned_rows, turned_columns), (small_ink, _, small_columns) = map(
        ink_spread, scenes.split(1))
    assert columns > 5 * rows and turned_rows > 5 * turned_columns
    assert turned_rows == pytest.approx(columns, rel=0.02)
    assert small_columns == pytest.approx(columns / 2, rel=0.05) and small_ink == pytest.approx(ink / 4, rel=0.05)


def test_corruption_changes_only_the_scenes_that_have_it():
    """The blurred scene is the clean scene blurred; the clean one is untouched."""
    controls = SceneControls((0,), (1,), ["stripes_v"], ("none", "gaussian_blur"), severity=3)
    digit, background = block_digit(), torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    scenes = controls.render(digit.expand(2, -1, -1, -1), background, torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 1, 0]]))
    assert torch.allclose(scenes[1], gaussian_blur(scenes[:1], 3)[0]) and not torch.allclose(scenes[0], scenes[1])
    assert torch.allclose(scenes[0], controls.render(digit, background, torch.zeros(1, 5, dtype=torch.long))[0])


def test_complexity_orders_flat_ramp_noise_and_a_ramp_gives_eight_times_its_slope():
    """Sobel on a ramp of slope a per column is 8a everywhere inside; a flat image is 0; noise is busier still."""
    flat = torch.full((1, 1, 16, 16), 0.4)
    ramp = (0.02 * torch.arange(16.0)).expand(1, 1, 16, 16)
    noise = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    complexity = sobel_complexity(torch.cat([flat, ramp, noise]))
    assert complexity[0].item() == pytest.approx(0.0, abs=1e-6)
    assert complexity[1].item() == pytest.approx(8 * 0.02, rel=1e-4)
    assert complexity[2] > 5 * complexity[1]


def test_grid_and_grouped_accuracies_equal_hand_counts():
    """Every combination once, last index fastest; accuracy per group and per pair of groups by hand."""
    grid = control_grid([2, 3])
    assert grid.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert control_grid([4]).tolist() == [[0], [1], [2], [3]]
    correct = torch.tensor([1, 0, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    first, second = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    accuracy = grouped_accuracy(correct, first, 4)
    assert accuracy[:3].tolist() == pytest.approx([2 / 3, 2 / 3, 0.0]) and math.isnan(accuracy[3])
    assert pairwise_accuracy(correct, first, second, 3, 2).flatten().tolist() == pytest.approx(
        [1.0, 0.0, 1.0, 0.5, 0.0, 0.0])


def test_conflicting_classes_cycle_through_every_other_class_and_decisions_are_counted():
    labels = torch.tensor([3] * 9 + [0])
    conflicts = conflicting_classes(labels, 10)
    assert sorted(conflicts[:9].tolist()) == [0, 1, 2, 4, 5, 6, 7, 8, 9] and conflicts[9].item() == 1
    decisions = cue_decisions(torch.tensor([3, 3, 5, 1]), torch.tensor([3, 3, 3, 3]), torch.tensor([5, 4, 5, 5]))
    assert decisions == pytest.approx({"shape": 0.5, "texture": 0.25, "other": 0.25, "shape_bias": 2 / 3})


@pytest.mark.parametrize("arguments, message", [
    (((0,), (1,), ["velvet"]), r"textures \['velvet'\]: use names from"),
    (((0,), (0.0,), ["solid"]), "scale 0.0: scales magnify"),
    (((0,), (1,), ["solid"], ["fog"]), r"corruptions \['fog'\]: use 'none' or names from"),
    (((), (1,), ["solid"]), "the rotation control has no values"),
    (((0,), (1,), ["solid"], ["none"], 7), "severity=7: use an integer from 1 to 5"),
])
def test_bad_control_values_are_refused_naming_them(arguments, message):
    with pytest.raises(ValueError, match=message):
        SceneControls(*arguments)
