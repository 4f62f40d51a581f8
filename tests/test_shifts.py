import pytest
import torch

from lit_robust.functional.shifts import contrast, gaussian_blur, gaussian_noise, rotate, translate


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
