"""Distribution shifts as pure functions on batches of [0, 1] images (used by the shifted DataModule and by the
methods' robustness reports)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def translate(images: torch.Tensor, dx: int = 0, dy: int = 0) -> torch.Tensor:
    """Shift every image by ``dx`` pixels right and ``dy`` pixels down, filling with zeros (deep CAMA §4 shifts
    MNIST digits this way)."""
    if dx == 0 and dy == 0:
        return images
    h, w = images.shape[-2:]
    padded = F.pad(images, [max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)])
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + h, left:left + w].contiguous()


def rotate(images: torch.Tensor, degrees: float = 0.0) -> torch.Tensor:
    """Rotate every image by ``degrees`` counter-clockwise about its centre, bilinear, zero fill (the rotation shift
    of deep CAMA's robustness tests, 002 §4)."""
    if degrees == 0:
        return images
    return rotate_and_scale(images, torch.full((len(images),), float(degrees)), torch.ones(len(images)))


def rotate_and_scale(images: torch.Tensor, degrees: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Image i rotated by ``degrees[i]`` counter-clockwise and magnified by ``scales[i]`` about its centre (0.5: half
    the size), bilinear, zero fill, one batched resampling — the pose and zoom controls of a controlled sweep."""
    theta = torch.deg2rad(degrees.to(images.dtype))
    cos, sin = torch.cos(theta) / scales, torch.sin(theta) / scales  # output → input coordinates: R(θ) / s
    zeros = torch.zeros_like(cos)
    matrix = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(matrix.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0.0, 1.0)


# Severity 1–5 constants of the common corruptions (Hendrycks & Dietterich's ImageNet-C / CIFAR-10-C).
NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)   # CIFAR-10-C's gaussian_blur: sized for 32×32 images, not ImageNet's
CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)
SHOT_PHOTONS = (500, 250, 100, 75, 50)           # CIFAR-10-C's shot_noise
IMPULSE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)  # CIFAR-10-C's impulse_noise
BRIGHTNESS_SHIFT = (0.05, 0.1, 0.15, 0.2, 0.3)   # CIFAR-10-C's brightness (added to the value channel)
PIXELATE_SCALE = (0.95, 0.9, 0.85, 0.75, 0.65)   # CIFAR-10-C's pixelate


def _severity(severity: int, table: tuple) -> float:
    if severity not in range(1, len(table) + 1):
        raise ValueError(f"severity={severity}: use an integer from 1 to {len(table)}")
    return table[severity - 1]


def gaussian_noise(images: torch.Tensor, severity: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive N(0, σ²) pixel noise, σ by severity, clipped to [0, 1]."""
    std = _severity(severity, NOISE_STD)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    return (images + std * noise).clamp(0.0, 1.0)


def gaussian_blur(images: torch.Tensor, severity: int = 1) -> torch.Tensor:
    """Separable Gaussian blur, σ (pixels) by severity, reflect padding, per channel."""
    sigma = _severity(severity, BLUR_SIGMA)
    radius = max(1, int(3 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-offsets.pow(2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = F.pad(images, [radius] * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x.clamp(0.0, 1.0)


def contrast(images: torch.Tensor, severity: int = 1) -> torch.Tensor:
    """Contrast reduction towards each image's mean: (x − μ)·c + μ, c by severity."""
    factor = _severity(severity, CONTRAST_FACTOR)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * factor + mean).clamp(0.0, 1.0)


def shot_noise(images: torch.Tensor, severity: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Poisson photon noise: Poisson(x·λ)/λ, λ photons at full intensity by severity."""
    photons = _severity(severity, SHOT_PHOTONS)
    counts = torch.poisson((images * photons).cpu(), generator=generator).to(images.device, images.dtype)
    return (counts / photons).clamp(0.0, 1.0)


def impulse_noise(images: torch.Tensor, severity: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Salt-and-pepper noise: a fraction of the pixels (by severity) set to 0 or 1, half each."""
    amount = _severity(severity, IMPULSE_AMOUNT)
    draw = torch.rand((2, *images.shape), generator=generator, dtype=images.dtype).to(images.device)
    hit = draw[0] < amount
    return torch.where(hit, (draw[1] < 0.5).to(images.dtype), images)


def brightness(images: torch.Tensor, severity: int = 1) -> torch.Tensor:
    """Brighter: every pixel raised by a constant (by severity), clipped; for grey images the value channel of
    ImageNet-C's HSV brightness is the pixel itself, and for colour ones the same shift is applied per channel."""
    return (images + _severity(severity, BRIGHTNESS_SHIFT)).clamp(0.0, 1.0)


def pixelate(images: torch.Tensor, severity: int = 1) -> torch.Tensor:
    """Downsample by a factor (by severity) with box averaging, then back up with nearest neighbours."""
    scale = _severity(severity, PIXELATE_SCALE)
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, int(h * scale)), max(1, int(w * scale))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


COMMON_CORRUPTIONS = {"gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
                      "gaussian_blur": gaussian_blur, "contrast": contrast, "brightness": brightness,
                      "pixelate": pixelate}
"""The ImageNet-C families that make sense on small images (Hendrycks & Dietterich 2019, "Benchmarking neural
network robustness to common corruptions and perturbations"), each ``fn(images, severity)`` with severities 1–5;
the noises also take a ``generator``."""
RANDOM_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise")


def corrupt(images: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``images`` under the common corruption ``name`` at ``severity``."""
    if name not in COMMON_CORRUPTIONS:
        raise ValueError(f"corruption {name!r}: use one of {sorted(COMMON_CORRUPTIONS)}")
    if name in RANDOM_CORRUPTIONS:
        return COMMON_CORRUPTIONS[name](images, severity, generator=generator)
    return COMMON_CORRUPTIONS[name](images, severity)


IMAGE_SHIFTS = {"translate": translate, "rotate": rotate, "gaussian_noise": gaussian_noise,
                "gaussian_blur": gaussian_blur, "contrast": contrast}
