"""LIME attributions under a chosen missingness, and the two checks of thesis 001 §5.3 (App. E.1.4).

LIME (Ribeiro et al. 2016) turns random subsets of an image's regions off, evaluates the model on each perturbed
image, and fits a ridge regression from the presence vector z ∈ {0, 1}^R to the logit of the originally predicted
class; the R weights are the region scores (the explanation). "Off" is a missingness approximation — a baseline
colour for any model, dropped tokens for a ViT — so the explanation inherits its bias (ch. 5):

- consistency: the top-k regions of explanations made with different baseline colours should agree (Jaccard, Fig.
  5.8); with dropped tokens they agree by construction, since no colour is involved;
- top-k ablation test: removing an explanation's top-k regions should flip the model's prediction faster than
  removing those of a random or another model's explanation (Fig. 5.9).

The perturbations z are shared by every image of a call, so the ridge solve is one (R × R) system for all images and
every pass over the model is dense (all images keep the same regions, which dropped tokens need).
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import torch

from lit_robust.functional.missingness_bias import LogitsFn


def baseline_colours(channels: int) -> torch.Tensor:
    """Eight baseline colours (8, C) in [0, 1]: the corners of the RGB cube for 3 channels (App. E.1.4), eight
    evenly spaced grey levels otherwise."""
    if channels == 3:
        return torch.tensor([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=torch.float32)
    return torch.linspace(0, 1, 8)[:, None].expand(8, channels).clone()


def random_presence(samples: int, regions: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """LIME's perturbations (S, R): each region present with probability ½."""
    return (torch.rand(samples, regions, generator=generator) < 0.5).float()


def perturbed_target_logits(logits: LogitsFn, images: torch.Tensor, presence: torch.Tensor, regions: torch.Tensor,
                            target: torch.Tensor, max_rows: int = 4096) -> torch.Tensor:
    """The logit of class ``target`` (N,) of every image (N, C, H, W) under every perturbation (S, R): (N, S).

    Perturbations keeping as many regions run together (every row of a pass keeps as many tokens, so dropped tokens
    stay dense), at most ``max_rows`` perturbed images per pass."""
    n, device = len(images), images.device
    presence, regions = presence.to(device), regions.to(device)
    keep = torch.einsum("sr,rhw->shw", presence, regions)  # (S, H, W), regions are disjoint
    counts = presence.sum(1)
    out = images.new_empty(n, len(presence))
    for count in torch.unique(counts):
        group = torch.nonzero(counts == count).flatten()
        step = max(1, max_rows // n)
        for first in range(0, len(group), step):
            chosen = group[first:first + step]
            rows = logits(images.repeat(len(chosen), 1, 1, 1), keep[chosen].repeat_interleave(n, 0))  # (c·N, K)
            picked = rows.view(len(chosen), n, -1).gather(2, target.view(1, n, 1).expand(len(chosen), -1, -1))
            out[:, chosen] = picked[..., 0].T.to(out.dtype)
    return out


def ridge_weights(presence: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Ridge regression with an intercept of every row of ``targets`` (N, S) on the shared design ``presence``
    (S, R): the coefficients (N, R), argmin_w ‖y − b − Z w‖² + α‖w‖² (scikit-learn's ``Ridge(alpha)``)."""
    z = presence.to(targets) - presence.to(targets).mean(0)
    y = targets - targets.mean(1, keepdim=True)
    gram = z.T @ z + alpha * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    return torch.linalg.solve(gram, z.T @ y.T).T


def lime_scores(logits: LogitsFn, images: torch.Tensor, regions: torch.Tensor, presence: torch.Tensor,
                target: torch.Tensor | None = None, alpha: float = 1.0, max_rows: int = 4096) -> torch.Tensor:
    """LIME region scores (N, R) of ``images`` for the class each is predicted as on the whole image (or
    ``target``), from the model's logits under the perturbations ``presence`` (S, R)."""
    if target is None:
        target = logits(images, images.new_ones(len(images), *images.shape[-2:])).argmax(-1)
    values = perturbed_target_logits(logits, images, presence, regions, target, max_rows)
    return ridge_weights(presence, values, alpha)


def topk_jaccard(scores_a: torch.Tensor, scores_b: torch.Tensor, k: int) -> torch.Tensor:
    """Per image (N,), the Jaccard similarity of the top-k regions of two explanations (N, R)."""
    a = torch.zeros_like(scores_a, dtype=torch.bool).scatter_(1, scores_a.topk(k, 1).indices, True)
    b = torch.zeros_like(scores_b, dtype=torch.bool).scatter_(1, scores_b.topk(k, 1).indices, True)
    union = (a | b).sum(1)
    return torch.where(union > 0, (a & b).sum(1).float() / union.clamp_min(1), 1.0)


def pairwise_consistency(explanations: Sequence[torch.Tensor], ks: Sequence[int]) -> torch.Tensor:
    """Mean top-k Jaccard similarity over images for every pair of explanations (P pairs, len(ks)), as Fig. 5.8
    averages over the 28 pairs of 8 baseline colours."""
    return torch.stack([torch.stack([topk_jaccard(a, b, k).mean() for k in ks])
                        for a, b in combinations(explanations, 2)])
