import pytest
import torch
from torch import nn

from lit_robust.models.weight_posteriors import (SWAG, MeanFieldGaussian, ScaleAdaptedSGHMC, SnapshotBank,
                                                 flatten_params, resample_precision, unflatten_draws)


def test_flatten_and_unflatten_round_trip():
    like = {"w": torch.randn(3, 2), "b": torch.randn(3)}
    flat = flatten_params(like)
    draws = unflatten_draws(torch.stack([flat, 2 * flat]), like)
    assert torch.equal(draws["w"][1], 2 * like["w"]) and torch.equal(draws["b"][0], like["b"])


def test_mean_field_kl_matches_torch_distributions():
    net = nn.Linear(4, 3)
    q = MeanFieldGaussian(net, rho_init=-2.0, mu_init_std=0.1, prior_sigma=0.5)
    mu = dict(net.named_parameters())
    expected = sum(torch.distributions.kl_divergence(torch.distributions.Normal(m, s),
                                                     torch.distributions.Normal(0.0, 0.5)).sum()
                   for m, s in zip(mu.values(), q.sigmas()))
    assert q.kl(mu).item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(mu["weight"].std().item() - 0.1) < 0.06  # μ ~ N(0, 0.1) as in §3.4


def test_mean_field_draws_have_softplus_rho_spread_and_are_seeded():
    net = nn.Linear(50, 40)
    q = MeanFieldGaussian(net, rho_init=-3.0)
    mu = {k: v.detach() for k, v in net.named_parameters()}
    a = q.rsample(mu, 200, torch.Generator().manual_seed(1))
    b = q.rsample(mu, 200, torch.Generator().manual_seed(1))
    assert torch.equal(a["weight"], b["weight"])
    sigma = torch.nn.functional.softplus(torch.tensor(-3.0)).item()
    assert (a["weight"] - mu["weight"]).std().item() == pytest.approx(sigma, rel=0.02)


def test_snapshot_bank_ring_keeps_the_last_k():
    bank = SnapshotBank(num_params=2, capacity=3)
    with pytest.raises(RuntimeError, match="snapshots"):
        bank.sample(2)
    for i in range(5):
        bank.collect(torch.tensor([float(i), 0.0]))
    assert sorted(bank.snapshots[:, 0].tolist()) == [2.0, 3.0, 4.0]
    draws = bank.sample(6, torch.Generator().manual_seed(0))
    assert sorted(draws[:, 0].tolist()) == [2.0, 2.0, 3.0, 3.0, 4.0, 4.0]


def test_swag_moments_and_sample_covariance():
    torch.manual_seed(0)
    snaps = torch.randn(40, 3) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([1.0, -1.0, 3.0])
    swag = SWAG(num_params=3, capacity=40, scale=1.0)
    for s in snaps:
        swag.collect(s)
    assert torch.allclose(swag.mean, snaps.mean(0), atol=1e-5)
    draws = swag.sample(20000, torch.Generator().manual_seed(0))
    assert torch.allclose(draws.mean(0), snaps.mean(0), atol=0.06)
    # scale 1: Σ_diag + Σ_lowrank ≈ 2 × the snapshots' variance
    assert torch.allclose(draws.var(0), 2 * snaps.var(0), rtol=0.25)


def test_sghmc_samples_a_standard_gaussian():
    torch.manual_seed(0)
    theta = nn.Parameter(torch.full((2000,), 3.0))  # 2,000 independent chains of U = θ²/2
    opt = ScaleAdaptedSGHMC([theta], lr=0.1, mdecay=0.05, num_burn_in_steps=200)
    samples = []
    for step in range(1500):
        opt.zero_grad()
        (0.5 * theta.pow(2)).sum().backward()
        opt.step()
        if step >= 1000 and step % 10 == 0:
            samples.append(theta.detach().clone())
    samples = torch.stack(samples)
    assert abs(samples.mean().item()) < 0.1
    assert samples.var().item() == pytest.approx(1.0, rel=0.15)
    assert int(opt.state[theta]["step"]) == 1500


def test_precision_gibbs_step_concentrates_on_the_conjugate_mean():
    torch.manual_seed(0)
    params = [torch.randn(10000) * 0.1]  # ||θ||² ≈ 100 → λ ≈ (1 + 5000) / (1 + 50) ≈ 98
    draws = torch.stack([resample_precision(params) for _ in range(50)])
    expected = (1 + 5000) / (1 + params[0].pow(2).sum() / 2)
    assert draws.mean().item() == pytest.approx(expected.item(), rel=0.03)
