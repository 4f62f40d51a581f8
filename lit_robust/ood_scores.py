"""Out-of-distribution scores of an ensemble of likelihoods (thesis 004, ch. 3 Eqs. 3.3, 3.14–3.19; ch. 4/5 hole
indicator Eq. 5.20) and the threshold-free detection metrics of §3.3 (AUROC, AUPRC, FPR80).

Every score takes the log-likelihoods ``log_liks`` of shape (N, B): ``log p(x_b | θ_n)`` for N posterior draws θ_n
(or, for a classical VAE, N independent importance-sampled estimates with one θ — ch. 5) and B inputs.
Likelihoods stay in log space throughout: ``p(x|θ)`` of a 256-pixel image underflows float32.

``outlier_scores`` orients every score so that **higher means more likely out-of-distribution**; the metrics take
OOD as the positive class.
"""
from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc


def importance_sampled_log_likelihood(log_px_z: torch.Tensor, log_pz: torch.Tensor,
                                      log_qz_x: torch.Tensor) -> torch.Tensor:
    """Eq. 3.3: ``log p_θ(x) ≈ log (1/S) Σ_s p_θ(x|z_s) p(z_s) / q_φ(z_s|x)`` with ``z_s ~ q_φ(z|x)``.

    The terms are shaped (..., S, B); the importance-sample axis is -2. Computed with logsumexp.
    """
    log_w = log_px_z + log_pz - log_qz_x
    return torch.logsumexp(log_w, dim=-2) - math.log(log_w.shape[-2])


def normalised_likelihoods(log_liks: torch.Tensor) -> torch.Tensor:
    """The weights ``w_θ = p(x|θ) / Σ_θ' p(x|θ')`` of Eqs. 3.16 and 3.18: a softmax over the draws (dim 0)."""
    return torch.softmax(log_liks, dim=0)


def expected_log_likelihood(log_liks: torch.Tensor) -> torch.Tensor:
    """Eq. 3.14: ``log E_θ[p(x|θ)] ≈ log (1/N) Σ_n p(x|θ_n)`` — the ensemble's (posterior predictive) log-likelihood."""
    return torch.logsumexp(log_liks, dim=0) - math.log(log_liks.shape[0])


def waic(log_liks: torch.Tensor) -> torch.Tensor:
    """Eq. 3.15: ``WAIC(x) = E_θ[log p(x|θ)] − Var_θ[log p(x|θ)]``.

    The thesis writes the equation with likelihoods; like the work it cites ([22], Choi et al. 2018) we use
    log-likelihoods, because likelihoods of images underflow and their variance is dominated by the largest draw.
    """
    return log_liks.mean(0) - log_liks.var(0, unbiased=True)


def typicality_test(log_liks: torch.Tensor, model_entropy: float | torch.Tensor) -> torch.Tensor:
    """Eq. 3.17 for one-element sequences (M = 1, as in the thesis): ``|−log p(x) − H[p(x; θ)]|``.

    ``log p(x)`` is the ensemble's Eq. 3.14 estimate; ``model_entropy`` estimates ``H`` as the mean negative
    log-likelihood of held-out inliers (Nalisnick et al. 2019 use training data; validation inliers avoid the
    optimistic bias of the training set). Larger = further from the typical set.
    """
    return (-expected_log_likelihood(log_liks) - model_entropy).abs()


def disagreement_score(log_liks: torch.Tensor) -> torch.Tensor:
    """Eq. 3.16: ``D_Θ[x] = 1 / Σ_θ w_θ²`` — the effective number of draws that agree (N when all agree, 1 when one
    dominates). Low = models disagree = OOD."""
    return 1.0 / normalised_likelihoods(log_liks).pow(2).sum(0)


def likelihood_entropy(log_liks: torch.Tensor) -> torch.Tensor:
    """Eq. 3.18: ``H_Θ[x] = −Σ_θ w_θ log w_θ`` — entropy of the normalised likelihoods. Low = OOD."""
    log_w = torch.log_softmax(log_liks, dim=0)
    return -(log_w.exp() * log_w).sum(0)


def std_of_log_likelihoods(log_liks: torch.Tensor) -> torch.Tensor:
    """Eq. 3.19 (= Eq. 5.19): sample standard deviation (1/(N−1)) of ``log p(x|θ)`` across the draws. High = OOD."""
    return log_liks.std(0, unbiased=True)


def hole_indicator(log_px_z: torch.Tensor) -> torch.Tensor:
    """Eq. 5.20 (ch. 4 §4.4.5): ``Σ_z[x]``, the sample standard deviation of the decoder term ``log p(x|z)`` over
    latent codes ``z ~ q_φ(z|x)`` — how far apart nearby codes decode; high = the code lies in a latent hole.

    ``log_px_z`` is (..., S, B); with leading posterior draws the per-draw indicators are averaged.
    """
    std = log_px_z.std(-2, unbiased=True)
    return std.reshape(-1, std.shape[-1]).mean(0)


SCORE_NAMES = ("expected_ll", "waic", "typicality", "disagreement", "entropy", "std_ll", "hole_indicator")


def outlier_scores(log_liks: torch.Tensor, log_px_z: torch.Tensor | None = None,
                   model_entropy: float | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every score of ch. 3–5 for B inputs, each oriented so that higher = more likely OOD.

    Scores whose inlier direction is "high" (expected LL, WAIC, disagreement, entropy) are negated. ``typicality``
    needs ``model_entropy`` and ``hole_indicator`` needs the per-sample decoder terms; each is left out without it.
    """
    if log_liks.dim() != 2 or log_liks.shape[0] < 2:
        raise ValueError(f"log_liks has shape {tuple(log_liks.shape)}: expected (N draws ≥ 2, B inputs); "
                         "raise num_draws to at least 2")
    scores = {
        "expected_ll": -expected_log_likelihood(log_liks),
        "waic": -waic(log_liks),
        "disagreement": -disagreement_score(log_liks),
        "entropy": -likelihood_entropy(log_liks),
        "std_ll": std_of_log_likelihoods(log_liks),
    }
    if model_entropy is not None:
        scores["typicality"] = typicality_test(log_liks, model_entropy)
    if log_px_z is not None:
        scores["hole_indicator"] = hole_indicator(log_px_z)
    return {name: scores[name] for name in SCORE_NAMES if name in scores}


def to_unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Dense ranks scaled to [0, 1]: an exact monotone map (ties kept) so torchmetrics' binary metrics read the
    scores as probabilities — it passes values outside [0, 1] through a sigmoid, which saturates (float32 sigmoid
    of any score above ~17 is 1.0) and turns large log-likelihood scores into ties."""
    unique, inverse = torch.unique(scores, return_inverse=True)
    return inverse.double() / max(len(unique) - 1, 1)


def fpr_at_tpr(scores: torch.Tensor, is_outlier: torch.Tensor, tpr: float = 0.8) -> torch.Tensor:
    """FPR80 of §3.3: the false-positive rate at the first threshold reaching ``tpr`` true-positive rate
    (outliers positive)."""
    fpr, tpr_curve, _ = binary_roc(to_unit_interval(scores), is_outlier.long())
    return fpr[torch.nonzero(tpr_curve >= tpr)[0, 0]]


def detection_metrics(inlier_scores: torch.Tensor, outlier_scores_: torch.Tensor) -> dict[str, float]:
    """One score separating inliers (0) from outliers (1): the thesis' AUROC, AUPRC and FPR80 (§3.3, outliers
    positive; AUPRC is OpenOOD's AUPR-Out) and OpenOOD's FPR95 (FPR at 95 % TPR, outliers positive) and AUPR-In
    (inliers positive, the score negated)."""
    scores = torch.cat([inlier_scores, outlier_scores_]).float()
    if not torch.isfinite(scores).all():
        raise ValueError("non-finite OOD scores: the log-likelihoods overflowed; check the decoder's outputs")
    labels = torch.cat([torch.zeros(len(inlier_scores)), torch.ones(len(outlier_scores_))]).long()
    unit = to_unit_interval(scores)
    return {"auroc": binary_auroc(unit, labels).item(),
            "auprc": binary_average_precision(unit, labels).item(),
            "aupr_in": binary_average_precision(1 - unit, 1 - labels).item(),
            "fpr80": fpr_at_tpr(scores, labels).item(),
            "fpr95": fpr_at_tpr(scores, labels, 0.95).item()}
