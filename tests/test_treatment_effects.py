"""ATE estimators (thesis 000 Eq. 2.4 and Table 3.2's baselines) and the Learning Mindsets stand-in SCM: the naive
difference of means is biased by a confounder that IPW and AIPW remove, the simulation's correlations are Table
3.1's and its true effect is τ."""
from __future__ import annotations

import pytest
import torch

from lit_robust.datamodules.tabular import MindsetDataModule
from lit_robust.functional.structural_equations import (MINDSET_CORRELATIONS, MINDSET_NODES, mindset_coefficients,
                                                         sample_mindset_scm)
from lit_robust.functional.treatment_effects import aipw_ate, difference_in_means, ipw_ate

TAU = 0.4


def confounded_toy() -> tuple[torch.Tensor, ...]:
    """A binary confounder x (half the units), treated 80 % when x = 1 and 20 % when x = 0, Y = τ·D + 2x + a
    unit-level term that sums to zero in every (x, D) cell: every estimator's exact value is known."""
    x = torch.tensor([1.0] * 10 + [0.0] * 10)
    d = torch.tensor([1.0] * 8 + [0.0] * 2 + [1.0] * 2 + [0.0] * 8)
    wiggle = torch.tensor([0.3, -0.3] * 10)
    y = TAU * d + 2 * x + wiggle
    propensity = torch.where(x == 1, 0.8, 0.2)
    return x, d, y, propensity


def test_the_naive_ate_carries_the_confounders_bias_and_ipw_and_aipw_remove_it():
    x, d, y, propensity = confounded_toy()
    # E[Y|D=1] − E[Y|D=0] = τ + 2·(P(x=1|D=1) − P(x=1|D=0)) = τ + 2·(0.8 − 0.2)
    assert difference_in_means(y, d).item() == pytest.approx(TAU + 1.2, abs=1e-5)
    assert ipw_ate(y, d, propensity).item() == pytest.approx(TAU, abs=1e-5)
    exact = aipw_ate(y, d, propensity, TAU + 2 * x, 2 * x)
    wrong_outcome_model = aipw_ate(y, d, propensity, torch.zeros_like(y), torch.zeros_like(y))  # doubly robust
    assert exact.item() == pytest.approx(TAU, abs=1e-5) and wrong_outcome_model.item() == pytest.approx(TAU, abs=1e-5)
    flat = torch.full_like(propensity, 0.5)   # a propensity that ignores x is the naive estimate again
    assert ipw_ate(y, d, flat).item() == pytest.approx(TAU + 1.2, abs=1e-5)


def test_the_estimators_work_along_the_last_dimension_of_a_stack():
    x, d, y, propensity = confounded_toy()
    stacked = ipw_ate(torch.stack([y, y + d]), d, propensity)
    assert torch.allclose(stacked, torch.tensor([TAU, TAU + 1.0]), atol=1e-5)


def test_the_mindset_simulation_has_table_3_1s_correlations_and_30_percent_treated():
    # the SCM's population correlations equal Table 3.1's by construction; at n = 200,000 a sample correlation's
    # std is ≤ 1/√n ≈ 0.0022, so 0.01 is ~4.5 standard errors, while dropping or flipping any edge moves one by ≥ 0.046
    rows = sample_mindset_scm(200_000, torch.Generator().manual_seed(0), tau=TAU)
    correlation = torch.corrcoef(rows.T)
    for pair, target in MINDSET_CORRELATIONS.items():
        i, j = (MINDSET_NODES.index(name) for name in pair.split("-"))
        assert correlation[i, j].item() == pytest.approx(target, abs=0.01), pair
    assert set(rows[:, 2].unique().tolist()) == {0.0, 1.0}
    assert rows[:, 2].mean().item() == pytest.approx(0.3, abs=0.005)


def test_the_mindset_simulations_true_ate_is_tau_and_its_naive_ate_is_biased_upwards():
    treated, control = (sample_mindset_scm(50_000, torch.Generator().manual_seed(1), tau=TAU, treatment=t)
                        for t in (1, 0))
    assert torch.equal(treated[:, :2], control[:, :2])                           # the same units under do(D)
    assert (treated[:, 3] - control[:, 3]).mean().item() == pytest.approx(TAU, abs=1e-5)
    observed = sample_mindset_scm(200_000, torch.Generator().manual_seed(2), tau=TAU)
    # population naive ATE = r_DY · s_Y / s_D = 0.4595: SE's confounding adds about 0.06
    assert difference_in_means(observed[:, 3], observed[:, 2]).item() == pytest.approx(0.4595, abs=0.015)
    assert mindset_coefficients(MINDSET_CORRELATIONS, 0.8, 0.3)["beta_se"] == pytest.approx(
        2 * mindset_coefficients(MINDSET_CORRELATIONS, TAU, 0.3)["beta_se"])   # τ sets the outcome's scale


def test_impossible_mindset_settings_are_refused_naming_them():
    with pytest.raises(ValueError, match="SE-Y"):
        mindset_coefficients({**MINDSET_CORRELATIONS, "SE-Y": 0.99, "SM-Y": -0.9}, TAU, 0.3)
    with pytest.raises(ValueError, match="treated_fraction=1.2"):
        mindset_coefficients(MINDSET_CORRELATIONS, TAU, 1.2)
    with pytest.raises(ValueError, match="give exactly the pairs"):
        MindsetDataModule(correlations={"SM-SE": 0.1}).setup()
