"""``pendulum``: the sun–pendulum–shadow images of CausalVAE ([YLC20], cited by thesis 000 §3.4.1, App. B.2.1),
rendered from their physical equations instead of read from files.

Scene (the generation script's geometry, data units on axes x ∈ [0, 20], y ∈ [−1, 21], a square image):
pivot (10, 10.5); rod to a bob of radius 1.5 at radius 8; the sun, a disc of radius 3 on the line y = 20.5 where the
light ray through the pivot meets it; the shadow, a bar on the ground line y = −0.5 between the projections of the
pivot and of the rod end (radius 9.5) along the light direction.

Causal factors (the DAG θ → shadow ← sun): ``theta`` (pendulum angle, degrees from vertical), ``sun`` (light angle,
degrees from the +x axis), ``shadow_length`` = max(3, |proj(pivot) − proj(rod end)|) and ``shadow_position`` = their
mean. ``intervene`` sets any factor and recomputes only its children, so do(θ) moves the shadow and do(shadow)
leaves θ and the sun alone.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lit_robust.datamodules.base import ImageDataModule
from lit_robust.datasets import TensorImageDataset

FACTORS = ("theta", "sun", "shadow_length", "shadow_position")
PIVOT = (10.0, 10.5)
BOB_RADIUS_ON_ROD, ROD_END_RADIUS, BOB_SIZE, SUN_SIZE = 8.0, 9.5, 1.5, 3.0
SUN_LINE, GROUND = 20.5, -0.5
X_RANGE, Y_RANGE = (0.0, 20.0), (-1.0, 21.0)
LINE_HALF_WIDTH = 0.5
COLOURS = {"rod": (0.0, 0.0, 0.0), "bob": (178 / 255, 34 / 255, 34 / 255), "sun": (1.0, 165 / 255, 0.0),
           "shadow": (0.0, 0.0, 0.0)}
# The generation script's sweep: θ = iπ/200, i = −40…43; light = jπ/200, j = 60…147 without j = 100 (vertical light).
GRID_THETA = [math.degrees(i * math.pi / 200) for i in range(-40, 44)]
GRID_SUN = [math.degrees(j * math.pi / 200) for j in range(60, 148) if j != 100]


def project_to_ground(x: torch.Tensor, y: torch.Tensor, sun_deg: torch.Tensor, base: float = GROUND) -> torch.Tensor:
    """x where the light ray through (x, y) at angle ``sun_deg`` meets the line y = base."""
    phi = torch.deg2rad(sun_deg)
    return x + (base - y) * torch.cos(phi) / torch.sin(phi)


def shadow_of(theta_deg: torch.Tensor, sun_deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The structural equations of the endogenous factors: (shadow_length, shadow_position)."""
    theta = torch.deg2rad(theta_deg)
    end_x = PIVOT[0] + ROD_END_RADIUS * torch.sin(theta)
    end_y = PIVOT[1] - ROD_END_RADIUS * torch.cos(theta)
    pivot_shadow = project_to_ground(torch.full_like(end_x, PIVOT[0]), torch.full_like(end_y, PIVOT[1]), sun_deg)
    end_shadow = project_to_ground(end_x, end_y, sun_deg)
    length = torch.clamp((pivot_shadow - end_shadow).abs(), min=3.0)
    return length, (pivot_shadow + end_shadow) / 2


def factors_from(theta_deg: torch.Tensor, sun_deg: torch.Tensor) -> torch.Tensor:
    """(N, 4) factors [theta, sun, shadow_length, shadow_position] generated from the exogenous pair."""
    length, position = shadow_of(theta_deg, sun_deg)
    return torch.stack([theta_deg, sun_deg, length, position], dim=1)


def intervene(factors: torch.Tensor, **values: float) -> torch.Tensor:
    """do(factor = value, ...): set the named factors, recompute the shadow from θ and the sun unless the shadow
    factors themselves are intervened on. Parents are never changed by intervening on a child."""
    unknown = set(values) - set(FACTORS)
    if unknown:
        raise ValueError(f"cannot intervene on {sorted(unknown)}: factors are {FACTORS}")
    out = factors.clone()
    for name, value in values.items():
        out[:, FACTORS.index(name)] = value
    length, position = shadow_of(out[:, 0], out[:, 1])
    if "shadow_length" not in values:
        out[:, 2] = length
    if "shadow_position" not in values:
        out[:, 3] = position
    return out


def _segment_distance(px, py, ax, ay, bx, by):
    """Distance from points (px, py) to segments a–b; all broadcastable tensors."""
    dx, dy = bx - ax, by - ay
    t = (((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-9)).clamp(0, 1)
    return torch.hypot(px - (ax + t * dx), py - (ay + t * dy))


def render(factors: torch.Tensor, img_size: int = 64, supersample: int = 3, chunk: int = 256) -> torch.Tensor:
    """RGB images (N, 3, img_size, img_size) in [0, 1] of the scenes given by (N, 4) factors (shadow drawn from the
    factor values, so noisy or intervened shadows show as such). Antialiased by supersampling."""
    side = img_size * supersample
    xs = X_RANGE[0] + (torch.arange(side) + 0.5) / side * (X_RANGE[1] - X_RANGE[0])
    ys = Y_RANGE[1] - (torch.arange(side) + 0.5) / side * (Y_RANGE[1] - Y_RANGE[0])
    px, py = xs.view(1, 1, side), ys.view(1, side, 1)
    images = []
    for block in factors.float().split(chunk):
        theta, sun, length, position = (block[:, k].view(-1, 1, 1) for k in range(4))
        rad = torch.deg2rad(theta)
        bob_x = PIVOT[0] + BOB_RADIUS_ON_ROD * torch.sin(rad)
        bob_y = PIVOT[1] - BOB_RADIUS_ON_ROD * torch.cos(rad)
        phi = torch.deg2rad(sun)
        sun_x = PIVOT[0] + (SUN_LINE - PIVOT[1]) * torch.cos(phi) / torch.sin(phi)
        masks = {
            "rod": _segment_distance(px, py, PIVOT[0], PIVOT[1], bob_x, bob_y) <= LINE_HALF_WIDTH,
            "bob": torch.hypot(px - bob_x, py - bob_y) <= BOB_SIZE,
            "sun": torch.hypot(px - sun_x, py - SUN_LINE) <= SUN_SIZE,
            "shadow": _segment_distance(px, py, position - length / 2, GROUND, position + length / 2,
                                        GROUND) <= LINE_HALF_WIDTH,
        }
        canvas = torch.ones(len(block), 3, side, side)
        for part, mask in masks.items():  # painter's order of the generation script
            colour = torch.tensor(COLOURS[part]).view(1, 3, 1, 1)
            canvas = torch.where(mask.unsqueeze(1), colour, canvas)
        images.append(torch.nn.functional.avg_pool2d(canvas, supersample))
    return torch.cat(images)


def add_shadow_noise(factors: torch.Tensor, snr_db: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise on the endogenous (shadow) factors at a given signal-to-noise ratio (thesis App. B.2.1: 10 dB)."""
    out = factors.clone()
    signal_std = factors[:, 2:].std(dim=0)
    noise_std = signal_std / math.sqrt(10 ** (snr_db / 10))
    out[:, 2:] += noise_std * torch.randn(out[:, 2:].shape, generator=generator)
    out[:, 2] = out[:, 2].clamp_min(0.0)
    return out


def sample_exogenous(sampling: str, n_samples: int, angle_range: float, generator: torch.Generator):
    """(θ, sun) pairs: the generation script's full grid, or independent uniform angles within ±angle_range of
    vertical (the thesis' tabular variant: (−45°, 45°))."""
    if sampling == "grid":
        theta, sun = torch.meshgrid(torch.tensor(GRID_THETA), torch.tensor(GRID_SUN), indexing="ij")
        return theta.reshape(-1), sun.reshape(-1)
    if sampling == "uniform":
        theta = (torch.rand(n_samples, generator=generator) * 2 - 1) * angle_range
        sun = 90.0 + (torch.rand(n_samples, generator=generator) * 2 - 1) * angle_range
        return theta, sun
    raise ValueError(f"data.sampling={sampling!r}: use 'grid' or 'uniform'")


class PendulumDataModule(ImageDataModule):
    """Pendulum images with their 4 causal factors as targets: items are ``(image, factors)``.

    Defaults reproduce the CausalVAE dataset (7,308 scenes, about one in four held out for test, no noise);
    ``sampling='uniform'`` with ``angle_range=45`` and ``noise_snr_db=10`` gives the thesis' tabular variant.
    """

    in_chans = 3
    num_factors = len(FACTORS)

    def __init__(self, img_size: int = 64, sampling: str = "grid", n_samples: int = 7308, angle_range: float = 45.0,
                 noise_snr_db: float | None = None, test_fraction: float = 0.25, val_fraction: float = 0.1,
                 **loader_kwargs):
        super().__init__(**loader_kwargs)
        self.size, self.sampling, self.n_samples, self.angle_range = img_size, sampling, n_samples, angle_range
        self.noise_snr_db, self.test_fraction, self.val_fraction = noise_snr_db, test_fraction, val_fraction

    def render(self, factors: torch.Tensor) -> torch.Tensor:
        return render(factors, self.size)

    def intervene(self, factors: torch.Tensor, **values: float) -> torch.Tensor:
        return intervene(factors, **values)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        theta, sun = sample_exogenous(self.sampling, self.n_samples, self.angle_range, generator)
        factors = factors_from(theta, sun)
        if self.noise_snr_db is not None:
            factors = add_shadow_noise(factors, self.noise_snr_db, generator)
        images = self.render(factors)
        order = torch.randperm(len(factors), generator=generator).numpy()
        n_test = int(round(self.test_fraction * len(order)))
        n_val = int(round(self.val_fraction * len(order)))
        test, val, train = (np.sort(part) for part in np.split(order, [n_test, n_test + n_val]))
        self.train_dataset = TensorImageDataset(images[train], factors[train])
        self.val_dataset = TensorImageDataset(images[val], factors[val])
        self.test_dataset = TensorImageDataset(images[test], factors[test])
