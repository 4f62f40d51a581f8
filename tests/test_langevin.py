import math

import pytest
import torch

from lit_robust.functional.langevin import energy_gradient, langevin_chain, langevin_step


def quadratic(scale: float):
    return lambda x: 0.5 * scale * x.flatten(1).pow(2).sum(1)


def test_step_matches_eq_6_7_in_reference_parameterisation():
    x = torch.randn(4, 1, 3, 3)
    noise = torch.randn_like(x)
    eps, temp = 1.25e-2, 1e-4
    out = langevin_step(quadratic(2.0), x, eps, temp, noise)
    expected = x - (eps ** 2 / 2) * (2.0 * x) / temp + eps * noise
    torch.testing.assert_close(out, expected)


def test_energy_gradient_is_per_sample_and_leaves_parameter_grads_alone():
    layer = torch.nn.Linear(3, 1)
    x = torch.randn(5, 3)
    grad = energy_gradient(lambda v: layer(v).squeeze(1), x)
    torch.testing.assert_close(grad, layer.weight.detach().expand(5, 3))
    assert layer.weight.grad is None


def test_chain_is_reproducible_from_its_generator_and_records_the_trajectory():
    x = torch.randn(8, 1, 4, 4)
    a, rec = langevin_chain(quadratic(1.0), x, 10, 0.1, 1.0, torch.Generator().manual_seed(3), record_every=5)
    b, _ = langevin_chain(quadratic(1.0), x, 10, 0.1, 1.0, torch.Generator().manual_seed(3))
    c, _ = langevin_chain(quadratic(1.0), x, 10, 0.1, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(rec) == 3 and torch.equal(rec[0], x) and torch.equal(rec[-1], a)


def test_chain_samples_the_tempered_gaussian():
    # G = |x|^2/2 at temperature T: x <- (1 - a) x + eps n with a = eps^2 / (2T); stationary var eps^2 / (1 - (1-a)^2).
    eps, temp = 0.2, 2.0
    a = eps ** 2 / (2 * temp)
    x, _ = langevin_chain(quadratic(1.0), torch.zeros(5000, 1), 800, eps, temp, torch.Generator().manual_seed(0))
    assert x.var().item() == pytest.approx(eps ** 2 / (1 - (1 - a) ** 2), rel=0.08)
    assert abs(x.mean().item()) < 0.05 * math.sqrt(temp)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"^steps=-1: the number of Langevin steps must be >= 0"):
        langevin_chain(quadratic(1.0), torch.zeros(1, 1), -1)
    with pytest.raises(ValueError, match="temperature=0"):
        langevin_chain(quadratic(1.0), torch.zeros(1, 1), 1, 0.1, 0)


def test_chain_equals_the_steps_taken_by_hand_with_the_same_noise():
    """3 steps of the chain = 3 calls of Eq. 6.7 with the generator's noise in order; records every 2nd state."""
    x0 = torch.randn(2, 3, dtype=torch.float64)
    energy = quadratic(3.0)
    final, records = langevin_chain(energy, x0, 3, 0.1, 0.5, torch.Generator().manual_seed(7), record_every=2)
    generator = torch.Generator().manual_seed(7)
    states = [x0]
    for _ in range(3):
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        states.append(states[-1] - (0.1 ** 2 / 2) * (3.0 * states[-1]) / 0.5 + 0.1 * noise)
    torch.testing.assert_close(final, states[3])
    assert final.dtype == torch.float64 and len(records) == 2
    torch.testing.assert_close(records[1], states[2])
    unchanged, none = langevin_chain(energy, x0, 0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unchanged, x0) and none == []  # zero steps; record_every=0 records nothing


def test_energy_gradient_inside_no_grad_matches_the_closed_form():
    x = torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():  # purification runs under no_grad
        grad = energy_gradient(lambda v: (v ** 3).sum(1), x)
    torch.testing.assert_close(grad, 3 * x ** 2)
    assert not x.requires_grad


@pytest.mark.parametrize("step_size,temperature", [(float("nan"), 1.0), (0.1, float("inf")), (-0.1, 1.0),
                                                   (0.0, 1.0), (0.1, -1.0)])
def test_chain_rejects_non_finite_or_non_positive_step_and_temperature(step_size, temperature):
    with pytest.raises(ValueError, match=r"^step_size=.*, temperature=.*: both must be finite numbers > 0"):
        langevin_chain(quadratic(1.0), torch.zeros(1, 1), 1, step_size, temperature)


def test_chain_defaults_are_the_reference_step_and_temperature():
    x = torch.randn(3, 2)
    default, _ = langevin_chain(quadratic(1.0), x, 1, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(default, x - (1.25e-2 ** 2 / 2) * x / 1e-4 + 1.25e-2 * noise)
