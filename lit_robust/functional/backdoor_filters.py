"""The baseline backdoor filters of seed 003's Table 1, each a few lines on one shared feature extractor.

- Spectral signatures (Tran et al. 2018): within each class, poisons dominate the top singular direction of the
  centred features; remove the samples with the largest squared projection (1.5 × the expected poison fraction).
- Activation clustering (Chen et al. 2018, as in ART: reduce to 10 dimensions, 2-means per class, a cluster holding
  < 35 % of its class is poison). ART reduces with FastICA; we use PCA (deterministic, no convergence failures on
  small classes) — a deviation that changes the projection, not the clustering rule.
- ITLM (Shen & Sanghavi 2019): train, keep the lowest-loss fraction, retrain a fresh model on it, repeat.

The shared features are the hidden activations of a weak learner (``lit_robust.functional.weak_learners.EnsembleMLP``) trained
on the whole poisoned training set — the representation the paper's baselines read from a late ResNet layer.
"""
from __future__ import annotations

import torch
from sklearn.cluster import KMeans

from lit_robust.functional.weak_learners import EnsembleMLP, fit_members, index_sets, member_features, member_losses


def poisoned_model_features(inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 10,
                            hidden: int = 256, lr: float = 1e-3, batch_size: int = 64,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Hidden activations (n, hidden) of one weak learner trained on all of (inputs, labels), poisons included."""
    model = EnsembleMLP(1, inputs.shape[1], num_classes, hidden).to(inputs.device)
    sets, _ = index_sets(torch.ones(1, len(labels), dtype=torch.bool, device=inputs.device))
    fit_members(model, inputs, labels, sets, epochs=epochs, batch_size=batch_size, lr=lr, generator=generator)
    return member_features(model, inputs)[0]


def spectral_signature_scores(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Outlier score of every sample: its squared projection on the top right-singular vector of its class's
    centred feature matrix (Tran et al. 2018, Algorithm 1)."""
    scores = torch.zeros(len(labels), device=features.device)
    for label in labels.unique():
        members = labels == label
        centred = features[members] - features[members].mean(0)
        top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        scores[members] = (centred @ top) ** 2
    return scores


def keep_every_class(keep: torch.Tensor, distrust: torch.Tensor, labels: torch.Tensor,
                     floor: int = 1) -> torch.Tensor:
    """``keep`` with, in every class left with fewer than ``floor`` kept samples, its ``floor`` least distrusted
    samples (lowest ``distrust``: spectral score, loss, …) kept again. A filter must never remove a whole class: the
    model would silently never see it, and on small data a per-class fraction rounded up or a global loss cut can
    take every member of a small class."""
    if floor < 1:
        raise ValueError(f"floor={floor}: every class keeps at least one sample")
    keep = keep.clone()
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        if int(keep[members].sum()) < min(floor, len(members)):
            keep[members[torch.topk(distrust[members], min(floor, len(members)), largest=False).indices]] = True
    return keep


def keep_below_top_fraction(scores: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep mask removing the ⌈fraction·|class|⌉ highest-scoring samples of every class, but never the last one
    (:func:`keep_every_class`)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"removal fraction {fraction} must be in [0, 1)")
    keep = torch.ones(len(labels), dtype=torch.bool, device=scores.device)
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        drop = int(torch.ceil(torch.tensor(fraction * len(members))))
        keep[members[torch.topk(scores[members], drop).indices]] = False
    return keep_every_class(keep, scores, labels)


def activation_clustering_keep(features: torch.Tensor, labels: torch.Tensor, dims: int = 10,
                               size_threshold: float = 0.35, seed: int = 0) -> torch.Tensor:
    """Keep mask of activation clustering: per class, PCA to ``dims``, 2-means; a cluster with fewer than
    ``size_threshold`` of the class's samples is removed (ART's ``cluster_analysis="smaller"``). With
    ``size_threshold`` ≤ 0.5 at most one of the two clusters is removed, so no class is ever emptied."""
    if not 0 < size_threshold <= 0.5:
        raise ValueError(f"size_threshold={size_threshold}: the share below which a cluster is poison must be in "
                         "(0, 0.5] (above 0.5 both clusters of a class could be removed)")
    keep = torch.ones(len(labels), dtype=torch.bool, device=features.device)
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        if len(members) < 2:
            continue
        centred = features[members] - features[members].mean(0)
        reduced = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:dims].T
        clusters = torch.from_numpy(KMeans(2, n_init=10, random_state=seed).fit_predict(reduced.cpu().numpy()))
        shares = torch.bincount(clusters, minlength=2).float() / len(members)
        keep[members[(shares < size_threshold)[clusters].to(keep.device)]] = False
    return keep


def trimmed_loss_keep(inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, keep_fraction: float,
                      rounds: int = 3, first_epochs: int = 10, epochs: int = 5, hidden: int = 256, lr: float = 1e-3,
                      batch_size: int = 64, generator: torch.Generator | None = None) -> torch.Tensor:
    """Iterative trimmed loss minimisation: each round a fresh learner trains on the current set, and the
    ``keep_fraction`` of all samples with the lowest loss becomes the next set (seed 003 App. B: 80 then 40 epochs,
    α = 96 % at ε = 10 %; fewer epochs here for the MLP learner). The cut is global, so a small or hard class
    could lose every member: the lowest-loss sample of each class is always kept (:func:`keep_every_class`)."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"ITLM keep_fraction {keep_fraction} must be in (0, 1]")
    keep = torch.ones(len(labels), dtype=torch.bool, device=inputs.device)
    for r in range(rounds):
        model = EnsembleMLP(1, inputs.shape[1], num_classes, hidden).to(inputs.device)
        sets, _ = index_sets(keep[None])
        fit_members(model, inputs, labels, sets, epochs=first_epochs if r == 0 else epochs, batch_size=batch_size,
                    lr=lr, generator=generator)
        losses = member_losses(model, inputs, labels)[0]
        keep = torch.zeros_like(keep)
        keep[torch.topk(losses, round(keep_fraction * len(labels)), largest=False).indices] = True
        keep = keep_every_class(keep, losses, labels)
    return keep
