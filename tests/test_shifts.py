import pytest
import torch

from lit_robust.functional.shifts import (COMMON_CORRUPTIONS, contrast, corrupt, gaussian_blur, gaussian_noise, rotate,
                                          translate)


def test_rotate_quarter_turn_matches_rot90_and_zero_is_identity():
    x = torch.rand(2, 1, 6, 6)
    assert torch.equal(rotate(x, 0), x)
    assert torch.allclose(rotate(x, 90), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)


def test_corruptions_grow_with_severity_and_stay_in_range():
    x = torch.rand(8, 1, 16, 16)
    for fn in (lambda s: gaussian_noise(x, s, generator=torch.Generator().manual_seed(0)),
               lambda s: gaussian_blur(x, s), lambda s: contrast(x, s)):
        changes = [(fn(s) - x).abs().mean().item() for s in range(1, 6)]
        assert all(a < b for a, b in zip(changes, changes[1:])), changes
        assert 0 <= fn(5).min() and fn(5).max() <= 1
    with pytest.raises(ValueError, match="severity"):
        contrast(x, 6)


def test_blur_keeps_constant_images_and_translate_composes():
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 5), flat, atol=1e-6)
    x = torch.rand(1, 1, 8, 8)
    assert torch.equal(translate(translate(x, 1, 0), 1, 0)[..., 2:], translate(x, 2, 0)[..., 2:])


@pytest.mark.parametrize("name", sorted(COMMON_CORRUPTIONS))
def test_every_common_corruption_changes_more_with_severity_and_stays_in_range(name):
    smooth = torch.nn.functional.interpolate(torch.rand(16, 1, 6, 6), size=(32, 32), mode="bilinear")
    x = smooth * 0.8 + 0.1   # smooth enough that pixelating coarser loses more
    changes = [(corrupt(x, name, s, torch.Generator().manual_seed(0)) - x).abs().mean().item() for s in range(1, 6)]
    assert 0 < changes[0] < changes[-1], changes
    if name != "pixelate":   # pixelate's error also depends on how the coarse grid aligns with the image's
        assert all(a < b for a, b in zip(changes, changes[1:])), changes
    assert 0 <= corrupt(x, name, 5, torch.Generator().manual_seed(0)).min() <= 1


def test_noise_corruptions_follow_their_generator_and_unknown_names_are_refused():
    x = torch.rand(4, 1, 8, 8)
    for name in ("shot_noise", "impulse_noise"):
        draw = lambda seed: corrupt(x, name, 3, torch.Generator().manual_seed(seed))  # noqa: E731
        assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    with pytest.raises(ValueError, match="'fog'"):
        corrupt(x, "fog", 1)
