"""Transfer influences of source classes on target examples (thesis 001 ch. 8, Eq. 8.1 and Algorithm 1): train many
source models on random subsets of the source classes, transfer each to the target task, and compare each target
example's outcome between the models whose source held a class and those whose source did not.

Tensors: ``included`` (M, K) bool — model m's source held class k; ``outcomes`` (M, T) — f(t; S_m), the transferred
model m's outcome on target example t (``transfer_outcome``); influences (K, T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OUTCOMES = ("softmax", "correct", "margin")


def random_class_subsets(num_subsets: int, num_classes: int, subset_size: int,
                         generator: torch.Generator) -> torch.Tensor:
    """(num_subsets, num_classes) bool: each row a uniformly random set of ``subset_size`` classes (Algorithm 1, line
    1; the thesis keeps half the classes)."""
    if not 0 < subset_size < num_classes:
        raise ValueError(f"subset_size={subset_size}: keep between 1 and {num_classes - 1} of the {num_classes} "
                         "classes, so that every class can be both in and out of a subset")
    scores = torch.rand(num_subsets, num_classes, generator=generator)
    picked = scores.argsort(dim=1)[:, :subset_size]
    return torch.zeros(num_subsets, num_classes, dtype=torch.bool).scatter_(1, picked, True)


def classes_never_varied(included: torch.Tensor) -> list[int]:
    """The classes that are in every subset or in none: Eq. 8.1 compares models with and without a class, so their
    influence is undefined."""
    held = included.sum(0)
    return torch.nonzero((held == 0) | (held == included.shape[0])).flatten().tolist()


def transfer_influence(included: torch.Tensor, outcomes: torch.Tensor) -> torch.Tensor:
    """Infl[C_k → t] = E[f(t; S) | C_k ⊂ S] − E[f(t; S) | C_k ⊄ S] (Eq. 8.1), the means taken over the models
    whose source held class k and over those whose source did not (Algorithm 1, line 7). Returns (K, T); positive: the
    class helps the transferred model on t."""
    if included.dim() != 2 or outcomes.dim() != 2 or included.shape[0] != outcomes.shape[0]:
        raise ValueError(f"included {tuple(included.shape)} and outcomes {tuple(outcomes.shape)}: pass (models, "
                         "classes) and (models, target examples) with one row per model")
    undefined = classes_never_varied(included)
    if undefined:
        raise ValueError(f"classes {undefined} are in every subset or in none of the {included.shape[0]}, so their "
                         "influence is undefined: train more subsets (or draw them with another seed)")
    inside = included.to(outcomes.dtype)
    outside = 1.0 - inside
    mean_in = inside.T @ outcomes / inside.sum(0).unsqueeze(1)
    mean_out = outside.T @ outcomes / outside.sum(0).unsqueeze(1)
    return mean_in - mean_out


def influence_by_target_class(influence: torch.Tensor, target_labels: torch.Tensor,
                              num_target_classes: int) -> torch.Tensor:
    """(K, num_target_classes): each source class's influence averaged over the target examples of each target class
    (the thesis' Fig. 8.3 per CIFAR-10 class; NaN for a class without examples). Where source and target classes
    correspond, a diagonal-dominant matrix says each source class helps its own target class most."""
    counts = torch.bincount(target_labels, minlength=num_target_classes).to(influence.dtype)
    members = F.one_hot(target_labels, num_target_classes).to(influence.dtype)
    return influence @ members / counts


def most_harmful_classes(influence: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` source classes with the most negative overall influence (the mean over target examples), most
    harmful first: the classes the thesis removes to raise target accuracy (§8.2, Fig. 8.2)."""
    if not 0 < count < influence.shape[0]:
        raise ValueError(f"count={count}: remove between 1 and {influence.shape[0] - 1} of the "
                         f"{influence.shape[0]} source classes")
    return influence.mean(1).argsort()[:count]


def transfer_outcome(logits: torch.Tensor, labels: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """f(t; S) for (..., T, C) target logits and (T,) labels: ``softmax`` — the probability of the true class (the
    thesis' choice), ``correct`` — 1 if the prediction is right, ``margin`` — the true logit minus the largest other
    (App. H.2.1). Returns (..., T)."""
    if kind not in OUTCOMES:
        raise ValueError(f"outcome={kind!r}: use one of {OUTCOMES}")
    index = labels.expand(logits.shape[:-1]).unsqueeze(-1)
    if kind == "softmax":
        return logits.softmax(-1).gather(-1, index).squeeze(-1)
    if kind == "correct":
        return (logits.argmax(-1) == labels).to(logits.dtype)
    true = logits.gather(-1, index).squeeze(-1)
    return true - logits.scatter(-1, index, float("-inf")).amax(-1)


def fit_linear_probes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-3,
                      max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-feature transfer (thesis App. H.1.2) for M frozen extractors at once: an L2-regularised softmax regression
    on each model's features (M, N, D) of the target training images, fitted to its optimum with L-BFGS. The problem
    is convex and separable across models, so each probe is that of its extractor alone, with no noise of its own to
    blur the influences. Returns weights (M, D, C) and biases (M, C) for ``features @ weight + bias``."""
    dtype = features.dtype
    features = features.detach().double()  # in float32 the summed loss hides the small changes of well-fitted probes
    weight = torch.zeros(features.shape[0], features.shape[2], num_classes, dtype=features.dtype,
                         device=features.device, requires_grad=True)
    bias = torch.zeros(features.shape[0], 1, num_classes, dtype=features.dtype, device=features.device,
                       requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = features @ weight + bias
        loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(features.shape[0]), reduction="sum")
        loss = loss / features.shape[1] + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().to(dtype), bias.detach().squeeze(1).to(dtype)
