"""The certificate of derandomized smoothing against m×m adversarial patches (thesis 001 §1.1.1, Eqs. 1.1–1.2,
App. A.4.1 and A.5), as pure functions of vote counts.

The smoothed classifier g(x) = argmax_c n_c(x) (Eq. 1.1) counts the base classifier's votes over the ablation set.
A patch can change only the ablations whose kept pixels it intersects — at most Δ of them — so g(x) is certified
when n_g > max_{c≠g} n_c + 2Δ (Eq. 1.2): after the attack n_g ≥ n_g − Δ > max n_c + Δ ≥ any n_c'. The inequality is
strict, so a tie never certifies, and the tie rule of g (lowest class index) never decides a certified image.

``rule="tight"`` is Levine & Feizi's exact condition (2020, Thm. 1): a margin of exactly 2Δ also certifies when g's
index is below every runner-up's, since the attack can at most bring one of them level and ties go to the lowest
index. Sound and tight on the votes: any image it does not certify has a change of ≤ Δ votes that flips g.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def vote_counts(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n_c(x) (Eq. 1.1): per image, how many ablations the base classifier assigns to each class.
    ``predictions`` (N, A) class indices → counts (N, num_classes)."""
    if predictions.numel() and (predictions.min() < 0 or predictions.max() >= num_classes):
        raise ValueError(f"predictions outside [0, {num_classes}): pass the model's num_classes")
    counts = torch.zeros(predictions.shape[0], num_classes, dtype=torch.long, device=predictions.device)
    return counts.scatter_add_(1, predictions.long(), torch.ones_like(predictions, dtype=torch.long))


def smoothed_prediction(counts: torch.Tensor) -> torch.Tensor:
    """g(x) = argmax_c n_c(x) (Eq. 1.1), ties broken towards the lowest class index (deterministic, so g is a
    function of the image)."""
    top = counts.max(dim=1, keepdim=True).values
    classes = torch.arange(counts.shape[1], device=counts.device).expand_as(counts)
    return torch.where(counts == top, classes, counts.shape[1]).min(dim=1).values


def column_delta(patch_size: int, width: int, stride: int = 1) -> int:
    """Δ = ⌈(m + b − 1)/s⌉, the most column ablations of width b at stride s that an m×m patch intersects (Eq. 1.2
    with App. A.4.1; the appendix prints ⌈(m + s − 1)/s⌉, a typo: at s = 1 it must reduce to m + b − 1).
    Exact when the stride divides the image width; see ``patch_delta`` otherwise."""
    if patch_size < 1 or width < 1 or stride < 1:
        raise ValueError(f"patch size {patch_size}, width {width}, stride {stride}: all must be positive integers")
    return math.ceil((patch_size + width - 1) / stride)


def block_delta(patch_size: int, width: int, stride: int = 1) -> int:
    """Δ = ⌈(m + b − 1)/s⌉² for b×b block ablations on an s×s grid of positions (App. A.5)."""
    return column_delta(patch_size, width, stride) ** 2


def patch_delta(masks: torch.Tensor, patch_size: int) -> int:
    """Δ counted exactly: the most ablations (masks (A, H, W), 1 = kept) whose kept pixels one m×m patch, placed
    anywhere inside the image, intersects.

    Deviation from the paper: this equals ``column_delta``/``block_delta`` when the stride divides the image side
    (tested), and stays sound when it does not — there the wrap-around puts two positions closer than s and the
    closed form undercounts."""
    height, width = masks.shape[-2:]
    if not 1 <= patch_size <= min(height, width):
        raise ValueError(f"patch size {patch_size} does not fit a {height}×{width} image")
    hit = F.max_pool2d(masks[:, None].float(), patch_size, stride=1)  # (A, 1, H-m+1, W-m+1): 1 where intersected
    return int(hit.sum(0).max().item())


RULES = ("strict", "tight")


def check_rule(rule: str, owner: str = "") -> str:
    """``rule`` if it is one of :data:`RULES`, else a ValueError naming the choices (``owner`` prefixes the key)."""
    if rule not in RULES:
        raise ValueError(f"{owner + ' ' if owner else ''}rule={rule!r}: use one of {RULES}")
    return rule


def certified(counts: torch.Tensor, delta: int | torch.Tensor, rule: str = "strict") -> torch.Tensor:
    """Per image, for g = ``smoothed_prediction(counts)``: ``strict`` is Eq. 1.2, n_g > max_{c≠g} n_c + 2Δ;
    ``tight`` adds n_g = max_{c≠g} n_c + 2Δ when g wins the tie with every runner-up (module docstring).
    ``delta`` may be a tensor of several Δ broadcast against the images (shape (N, P) with ``delta`` (P,))."""
    check_rule(rule)
    margin, wins = certified_margin(counts), wins_ties(counts)
    if isinstance(delta, torch.Tensor) and delta.dim():
        margin, wins = margin[:, None], wins[:, None]
    strict = margin > 2 * delta
    return strict if rule == "strict" else strict | ((margin == 2 * delta) & wins)


def wins_ties(counts: torch.Tensor) -> torch.Tensor:
    """Per image: g's class index is below that of every runner-up (every c ≠ g with the largest count but g's)."""
    prediction = smoothed_prediction(counts)
    others = counts.scatter(1, prediction[:, None], torch.iinfo(counts.dtype).min)
    runner_up = others.max(dim=1, keepdim=True).values
    classes = torch.arange(counts.shape[1], device=counts.device).expand_as(counts)
    return prediction < torch.where(others == runner_up, classes, counts.shape[1]).min(dim=1).values


def certified_margin(counts: torch.Tensor) -> torch.Tensor:
    """n_g − max_{c≠g} n_c per image (the per-sample record); Eq. 1.2 holds iff margin > 2Δ."""
    prediction = smoothed_prediction(counts)
    top = counts.gather(1, prediction[:, None]).squeeze(1)
    others = counts.scatter(1, prediction[:, None], torch.iinfo(counts.dtype).min)
    return top - others.max(dim=1).values


def certified_correct(counts: torch.Tensor, targets: torch.Tensor, delta: int, rule: str = "strict") -> torch.Tensor:
    """Per image: g(x) = y and certified (the numerator of certified accuracy, §1.1.1)."""
    return (smoothed_prediction(counts) == targets) & certified(counts, delta, rule)


def ablation_votes(ablated_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                   masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (N, K) of the base classifier's votes over all ablations ``masks`` (A, H, W) of every image.
    ``ablated_logits(images, masks)`` returns logits (N, A, K) and does the batching (many positions per forward)."""
    return vote_counts(ablated_logits(images, masks).argmax(-1), num_classes)


class CertifiedAccuracy(Metric):
    """Smoothed accuracy and certified accuracy for several patch sizes, from vote counts (§1.1.1).

    ``deltas`` maps each patch size m to its Δ; ``rule`` is ``strict`` (Eq. 1.2) or ``tight`` (:func:`certified`);
    ``compute()`` returns ``{"acc": …, "acc_m<m>": …}``. The state is sums over images, so torchmetrics syncs it
    across DDP ranks exactly. A certifier without vote counts (PatchCleanser) passes the patch sizes alone and updates
    with its own correct/certified flags."""

    full_state_update = False

    def __init__(self, deltas: dict[int, int] | list[int], rule: str = "strict", **kwargs):
        super().__init__(**kwargs)
        if not deltas:
            raise ValueError("CertifiedAccuracy needs at least one patch size: pass deltas={m: Δ, …}")
        self.rule = check_rule(rule)
        self.patch_sizes = sorted(deltas)
        if isinstance(deltas, dict):
            self.register_buffer("deltas", torch.tensor([deltas[m] for m in self.patch_sizes]), persistent=False)
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("certified", torch.zeros(len(self.patch_sizes), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, counts: torch.Tensor | None = None, targets: torch.Tensor | None = None, *,
               correct: torch.Tensor | None = None, certified_flags: torch.Tensor | None = None) -> None:
        """Add images, from vote counts (N, K) and targets (N,), or — a certifier without votes — from ``correct``
        (N,): the defended prediction is the label, and ``certified_flags`` (N, P) per patch size (counted only where
        also correct)."""
        if counts is not None:
            if not hasattr(self, "deltas"):
                raise ValueError("CertifiedAccuracy was built from patch sizes alone: pass deltas={m: Δ} to count "
                                 "votes, or update(correct=…, certified_flags=…)")
            correct = smoothed_prediction(counts) == targets
            certified_flags = certified(counts, self.deltas.to(counts.device), self.rule)
        self.correct += correct.sum()
        self.certified += (correct[:, None] & certified_flags).sum(0)
        self.total += len(correct)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp(min=1).float()
        result = {"acc": self.correct / total}
        result.update({f"acc_m{m}": self.certified[i] / total for i, m in enumerate(self.patch_sizes)})
        return result
