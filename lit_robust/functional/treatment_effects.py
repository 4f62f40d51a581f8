"""Average treatment effect (ATE) estimators on tensors (thesis 000 §2.2, Eq. 2.4, and the adjusted baselines of
Table 3.2): the naive difference of means, inverse propensity weighting and its augmented (doubly robust) form.
Every function works along the last dimension, so a stack of datasets (models, bootstraps) is one call."""
from __future__ import annotations

import torch


def difference_in_means(outcome: torch.Tensor, treated: torch.Tensor) -> torch.Tensor:
    """Eq. 2.4: E[Y | D = 1] − E[Y | D = 0], the naive ATE (unbiased only without confounding)."""
    treated = treated.to(outcome.dtype)
    return ((outcome * treated).sum(-1) / treated.sum(-1)
            - (outcome * (1 - treated)).sum(-1) / (1 - treated).sum(-1))


def ipw_ate(outcome: torch.Tensor, treated: torch.Tensor, propensity: torch.Tensor) -> torch.Tensor:
    """Inverse propensity weighting with normalised (Hájek) weights: each arm's outcomes weighted by 1 / e(x) or
    1 / (1 − e(x)), e(x) = P(D = 1 | x) — unbiased when e is the true propensity and every confounder is in x."""
    treated = treated.to(outcome.dtype)
    w1, w0 = treated / propensity, (1 - treated) / (1 - propensity)
    return (w1 * outcome).sum(-1) / w1.sum(-1) - (w0 * outcome).sum(-1) / w0.sum(-1)


def aipw_ate(outcome: torch.Tensor, treated: torch.Tensor, propensity: torch.Tensor, predicted_treated: torch.Tensor,
             predicted_control: torch.Tensor) -> torch.Tensor:
    """Augmented IPW (doubly robust): mean of μ₁ − μ₀ + D(Y − μ₁)/e − (1 − D)(Y − μ₀)/(1 − e), with μ_d(x) an
    outcome model per arm — consistent when either the propensity or the outcome model is right."""
    treated = treated.to(outcome.dtype)
    return (predicted_treated - predicted_control + treated * (outcome - predicted_treated) / propensity
            - (1 - treated) * (outcome - predicted_control) / (1 - propensity)).mean(-1)

