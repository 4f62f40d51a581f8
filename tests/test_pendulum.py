"""Pendulum: the generation script's sweep and geometry, interventions that respect the DAG, the noisy variant."""
from __future__ import annotations

import math

import pytest
import torch

from lit_robust.datamodules.pendulum import (FACTORS, PendulumDataModule, add_shadow_noise, factors_from, intervene,
                                             render, shadow_of)


def test_grid_reproduces_the_reference_sweep_and_ranges():
    dm = PendulumDataModule(img_size=16)
    dm.setup()
    factors = torch.cat([d.targets for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)])
    assert len(factors) == 84 * 87 == 7308
    assert abs(len(dm.test_dataset) / 7308 - 0.25) < 0.01
    low, high = factors.min(0).values, factors.max(0).values
    assert low[0] == pytest.approx(-36.0) and high[0] == pytest.approx(38.7)
    assert low[1] == pytest.approx(54.0) and high[1] == pytest.approx(132.3)
    assert low[2] == pytest.approx(3.0) and 12.5 < high[2] < 12.7
    assert 1.9 < low[3] < 2.1 and 19.5 < high[3] < 19.7
    assert dm.train_dataset.images.shape[1:] == (3, 16, 16)


def test_shadow_follows_the_projection_of_pivot_and_rod_end():
    # Light straight from above (90°): the shadow of a vertical rod is a point under the pivot -> length clamped to 3.
    length, position = shadow_of(torch.tensor([0.0]), torch.tensor([90.0]))
    assert length.item() == pytest.approx(3.0) and position.item() == pytest.approx(10.0)
    # Light at 45° and rod horizontal (θ = 90°): projections of (10, 10.5) and (19.5, 10.5) are 11 apart, shifted.
    length, position = shadow_of(torch.tensor([90.0]), torch.tensor([45.0]))
    assert length.item() == pytest.approx(9.5, abs=1e-4)
    assert position.item() == pytest.approx((10 - 11) / 1 + 9.5 / 2, abs=1e-4)


def test_do_theta_moves_only_the_shadow_and_do_shadow_moves_nothing_upstream():
    factors = factors_from(torch.tensor([10.0, -20.0]), torch.tensor([70.0, 110.0]))
    moved = intervene(factors, theta=30.0)
    assert torch.equal(moved[:, 1], factors[:, 1])
    assert (moved[:, 3] - factors[:, 3]).abs().min() > 0.5
    shadow_only = intervene(factors, shadow_position=5.0)
    assert torch.equal(shadow_only[:, :3], factors[:, :3]) and torch.all(shadow_only[:, 3] == 5.0)
    with pytest.raises(ValueError, match="moon"):
        intervene(factors, moon=1.0)


def test_rendering_shows_the_intervened_shadow_and_nothing_else():
    factors = factors_from(torch.tensor([0.0]), torch.tensor([60.0]))
    before = render(factors, img_size=64)
    after = render(intervene(factors, shadow_position=16.0), img_size=64)
    changed_rows = (before - after).abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    assert len(changed_rows) > 0 and changed_rows.min() >= 58  # only the ground line near the bottom changes
    bob_row, bob_col = int((21 - (10.5 - 8)) / 22 * 64), 32
    assert before[0, :, bob_row, bob_col].tolist() == pytest.approx([178 / 255, 34 / 255, 34 / 255], abs=0.02)


def test_tabular_variant_adds_shadow_noise_at_the_requested_snr():
    generator = torch.Generator().manual_seed(0)
    theta = (torch.rand(20000, generator=generator) * 2 - 1) * 45
    sun = 90 + (torch.rand(20000, generator=generator) * 2 - 1) * 45
    clean = factors_from(theta, sun)
    noisy = add_shadow_noise(clean, snr_db=10, generator=generator)
    assert torch.equal(noisy[:, :2], clean[:, :2])
    noise = noisy[:, 3] - clean[:, 3]
    snr_db = 10 * math.log10(clean[:, 3].var().item() / noise.var().item())
    assert snr_db == pytest.approx(10, abs=0.3)
    dm = PendulumDataModule(img_size=16, sampling="uniform", n_samples=200, noise_snr_db=10)
    dm.setup()
    assert dm.train_dataset.targets[:, 0].abs().max() < 45 and len(FACTORS) == dm.num_factors
