"""Structural equation models to sample from: the SCNN exam model (thesis 000 §2.3.3.1, Eqs. 2.8–2.9), random
linear DAGs after NOTEARS (thesis 000 §4.2.3, App. B.3), a stand-in for the Learning Mindsets data (thesis 000
§3.4.2, Table 3.1) with a known treatment effect, and deep CAMA's generic measurement data (seed 002 §4.2, App.)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lit_robust.functional.causal_structure import topological_levels

SCNN_NODES = ("C", "T", "E", "TQ", "P", "Y")
# Fig. 2.4's DAG, read from the equations: C, T → E; T → TQ; E, C → P; P, E, TQ → Y.
SCNN_EDGES = (("C", "E"), ("T", "E"), ("T", "TQ"), ("E", "P"), ("C", "P"), ("P", "Y"), ("E", "Y"), ("TQ", "Y"))
SCNN_NOISE_STD = 0.1   # N(μ, 0.1) read as a standard deviation: the Bayes MSE of Y | C, T is then 0.32 (Table 2.1)
# The Learning Mindsets variables (thesis 000 §3.4.2): school mindset, success expectation, the intervention (treatment)
# and the achievement score; Table 3.1's correlations as "A-B" pairs.
MINDSET_NODES = ("SM", "SE", "D", "Y")
MINDSET_CORRELATIONS = {"SM-SE": -0.054, "SM-D": -0.046, "SM-Y": -0.111, "SE-D": 0.059, "SE-Y": 0.439, "D-Y": 0.221}


def scnn_sem(kind: str, c: torch.Tensor, t: torch.Tensor, noise: Callable[[float], torch.Tensor]) -> torch.Tensor:
    """(N, 6) values of [C, T, E, TQ, P, Y] from the inputs: Eq. 2.8 (``kind='linear'``) or 2.9 (``'nonlinear'``);
    ``noise(mean)`` gives each equation's additive N(mean, ·) term (its mean alone: the noise-free equations of
    Eq. 2.11)."""
    if kind == "linear":
        e = 2 * c + t + noise(4.0)
        tq = 2 * t + noise(0.0)
        p = 1.5 * e + 0.5 * c + noise(0.5)
        y = 1.5 * p + 3 * e + tq + noise(0.0)
    elif kind == "nonlinear":
        e = 2 * c ** 3 + t ** 2 + noise(0.0)
        tq = 2 * t + noise(0.0)
        p = 1.5 * torch.sin(e) + 0.5 * torch.sin(c) + noise(0.5)
        y = 1.5 * p ** 3 + 3 * torch.exp(e) + 2.5 * tq + noise(0.0)
    else:
        raise ValueError(f"sem={kind!r}: use 'linear' (Eq. 2.8) or 'nonlinear' (Eq. 2.9)")
    return torch.stack([c, t, e, tq, p, y], dim=1)


def sample_scnn_sem(kind: str, n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """N draws of the exam model: C, T ~ N(0, 0.1) and N(mean, 0.1) noise on every equation."""
    c, t = (SCNN_NOISE_STD * torch.randn(n_samples, generator=generator) for _ in range(2))
    return scnn_sem(kind, c, t, lambda mean: mean + SCNN_NOISE_STD * torch.randn(n_samples, generator=generator))


def scnn_verification_grid(kind: str) -> torch.Tensor:
    """Eq. 2.11's verification values: C, T on the grid −0.4:0.08:0.4 (11 × 11) through the noise-free equations."""
    axis = torch.linspace(-0.4, 0.4, 11)
    c, t = (v.reshape(-1) for v in torch.meshgrid(axis, axis, indexing="ij"))
    return scnn_sem(kind, c, t, lambda mean: torch.full_like(c, mean))


def random_dag(num_nodes: int, num_edges: int, generator: torch.Generator) -> torch.Tensor:
    """(D, D) weighted adjacency of a random DAG (NOTEARS' Erdős–Rényi layout): ``num_edges`` edges drawn among the
    pairs of a random order, weights N(0, 1)."""
    pairs = num_nodes * (num_nodes - 1) // 2
    if not 0 <= num_edges <= pairs:
        raise ValueError(f"num_edges={num_edges}: a DAG of {num_nodes} nodes has 0 to {pairs} edges")
    upper = torch.triu_indices(num_nodes, num_nodes, offset=1)
    chosen = upper[:, torch.randperm(pairs, generator=generator)[:num_edges]]
    weights = torch.zeros(num_nodes, num_nodes)
    weights[chosen[0], chosen[1]] = torch.randn(num_edges, generator=generator)
    order = torch.randperm(num_nodes, generator=generator)
    return weights[order][:, order]


def sample_linear_sem(weights: torch.Tensor, n_samples: int, snr_db: float | None,
                      generator: torch.Generator) -> torch.Tensor:
    """(N, D) draws of X_j = Σ_i W_ij X_i + ε_j: roots N(0, 1); each child's noise at ``snr_db`` of its signal's
    variance (None: noise-free children, SNR ∞)."""
    values = torch.zeros(n_samples, len(weights))
    for level in topological_levels((weights != 0).float()):
        for j in level:
            if not bool((weights[:, j] != 0).any()):
                values[:, j] = torch.randn(n_samples, generator=generator)
                continue
            signal = values @ weights[:, j]
            values[:, j] = signal
            if snr_db is not None:
                values[:, j] += signal.std() / math.sqrt(10 ** (snr_db / 10)) * torch.randn(n_samples,
                                                                                             generator=generator)
    return values


def perturbed_dags(adjacency: torch.Tensor, num_flips: int, count: int,
                   generator: torch.Generator) -> list[torch.Tensor]:
    """Up to ``count`` distinct hypotheses at structural Hamming distance ``num_flips`` from ``adjacency`` (fewer
    when the DAG has fewer): edges into non-root nodes toggled along the true order, so each stays a DAG and keeps
    the truth's exogenous set."""
    order = torch.cat([torch.tensor(level) for level in topological_levels(adjacency)])
    roots = ~adjacency.bool().any(0)
    candidates = [(int(order[a]), int(order[b])) for b in range(len(order)) for a in range(b)
                  if not roots[order[b]]]
    if num_flips > len(candidates):
        raise ValueError(f"num_flips={num_flips}: this DAG has only {len(candidates)} togglable pairs")
    found, seen = [], set()
    for _ in range(50 * count):
        picks = torch.randperm(len(candidates), generator=generator)[:num_flips].tolist()
        key = tuple(sorted(picks))
        if key in seen:
            continue
        seen.add(key)
        hypothesis = adjacency.clone()
        for pick in picks:
            i, j = candidates[pick]
            hypothesis[i, j] = 1 - hypothesis[i, j]
        found.append(hypothesis)
        if len(found) == count:
            break
    return found


def mindset_coefficients(correlations: dict[str, float], tau: float, treated_fraction: float) -> dict[str, float]:
    """The Mindset stand-in's parameters, chosen so its population correlations are ``correlations`` exactly:

    SM, SE ~ N(0, 1) with correlation ρ; D = 1[a·SM + b·SE + e > c], e ~ N(0, 1 − Var(a·SM + b·SE)), so the
    latent score L is N(0, 1) and c = Φ⁻¹(1 − p) treats a share p. For Gaussian X, Stein's lemma gives
    Cov(X, D) = Cov(X, L)·φ(c), so (a, b) solve a 2×2 system for the SM–D and SE–D correlations.
    Y = β_SM·SM + β_SE·SE + τ·D + σ·ε: with Σ the covariance of (SM, SE, D) and r Table 3.1's Y correlations times
    the columns' std, Σ·w = s_Y·r fixes w = (β_SM, β_SE, τ) up to the scale s_Y, which τ then fixes;
    σ² = s_Y²·(1 − rᵀΣ⁻¹r). Infeasible correlations (a non-positive variance) are refused."""
    if not 0.0 < treated_fraction < 1.0:
        raise ValueError(f"treated_fraction={treated_fraction}: use a share of treated units in (0, 1)")
    expected = set(MINDSET_CORRELATIONS)
    if set(correlations) != expected:
        raise ValueError(f"correlations {sorted(correlations)}: give exactly the pairs {sorted(expected)}")
    r = {key: float(value) for key, value in correlations.items()}
    normal = torch.distributions.Normal(0.0, 1.0)
    threshold = float(normal.icdf(torch.tensor(1.0 - treated_fraction)))
    density = math.exp(-threshold ** 2 / 2) / math.sqrt(2 * math.pi)
    sd_d = math.sqrt(treated_fraction * (1.0 - treated_fraction))
    exogenous = torch.tensor([[1.0, r["SM-SE"]], [r["SM-SE"], 1.0]], dtype=torch.float64)
    cov_latent = torch.tensor([r["SM-D"], r["SE-D"]], dtype=torch.float64) * sd_d / density
    a, b = torch.linalg.solve(exogenous, cov_latent).tolist()
    latent_noise = 1.0 - (a * a + b * b + 2 * a * b * r["SM-SE"])
    sigma = torch.tensor([[1.0, r["SM-SE"], r["SM-D"] * sd_d], [r["SM-SE"], 1.0, r["SE-D"] * sd_d],
                          [r["SM-D"] * sd_d, r["SE-D"] * sd_d, sd_d ** 2]], dtype=torch.float64)
    with_y = torch.tensor([r["SM-Y"], r["SE-Y"], r["D-Y"] * sd_d], dtype=torch.float64)
    per_scale = torch.linalg.solve(sigma, with_y)
    explained = float(with_y @ per_scale)
    if latent_noise <= 0 or explained >= 1 or float(per_scale[2]) * tau <= 0 \
            or bool((torch.linalg.eigvalsh(sigma) <= 0).any()):
        raise ValueError(f"correlations {correlations} with tau={tau} admit no such SCM (a variance would be ≤ 0 or "
                         "the outcome's scale negative): use weaker correlations or a tau of the sign of D–Y")
    scale = tau / float(per_scale[2])
    return {"rho": r["SM-SE"], "a": a, "b": b, "latent_noise_std": math.sqrt(latent_noise), "threshold": threshold,
            "beta_sm": scale * float(per_scale[0]), "beta_se": scale * float(per_scale[1]), "tau": tau,
            "noise_std": scale * math.sqrt(1.0 - explained)}


def sample_mindset_scm(n_samples: int, generator: torch.Generator, tau: float = 0.4, treated_fraction: float = 0.3,
                       correlations: dict[str, float] | None = None, treatment: int | None = None) -> torch.Tensor:
    """(N, 4) rows of [SM, SE, D, Y] from :func:`mindset_coefficients`' SCM; ``treatment`` 0 or 1 draws the same
    units under do(D = treatment) instead (the same noise for a given generator state), so the ATE is exactly τ."""
    k = mindset_coefficients(correlations or MINDSET_CORRELATIONS, tau, treated_fraction)
    sm, independent = torch.randn(2, n_samples, generator=generator)
    se = k["rho"] * sm + math.sqrt(1.0 - k["rho"] ** 2) * independent
    latent = k["a"] * sm + k["b"] * se + k["latent_noise_std"] * torch.randn(n_samples, generator=generator)
    d = (latent > k["threshold"]).float()
    if treatment is not None:
        if treatment not in (0, 1):
            raise ValueError(f"treatment={treatment}: do(D = 0) or do(D = 1), or None for the observed D")
        d = torch.full_like(d, float(treatment))
    y = k["beta_sm"] * sm + k["beta_se"] * se + k["tau"] * d + k["noise_std"] * torch.randn(n_samples,
                                                                                             generator=generator)
    return torch.stack([sm, se, d, y], dim=1)


def measurement_labels(parents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Y = argmax_k (g(A)_k + σ_Y ε_k) with g(A) = 0.2A² − 0.8A (seed 002 App., "Measurement data generation"): one
    parent column per class; ``noise`` is σ_Y ε, of A's shape."""
    return (0.2 * parents ** 2 - 0.8 * parents + noise).argmax(-1)


def measurement_mechanism(num_classes: int, coparent_dim: int, child_dim: int,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The random parameters of the children's mechanism f(Y, C) (:func:`measurement_children`): per child, a
    linear and a quadratic direction on v = [onehot(y), c], drawn N(0, 1 / len(v)) as the paper draws them from a
    Gaussian."""
    width = num_classes + coparent_dim
    linear, quadratic = torch.randn(2, width, child_dim, generator=generator) / math.sqrt(width)
    return {"linear": linear, "quadratic": quadratic}


def measurement_children(mechanism: dict[str, torch.Tensor], labels: torch.Tensor,
                         coparents: torch.Tensor) -> torch.Tensor:
    """X = f(Y, C) before normalisation and noise: f_j(v) = w_jᵀv + (u_jᵀv)², quadratic in v = [onehot(y), c], so
    the children depend on the label, the co-parents and their interactions."""
    num_classes = mechanism["linear"].shape[0] - coparents.shape[-1]
    v = torch.cat([torch.nn.functional.one_hot(labels, num_classes).to(coparents.dtype), coparents], dim=-1)
    return v @ mechanism["linear"] + (v @ mechanism["quadratic"]) ** 2
