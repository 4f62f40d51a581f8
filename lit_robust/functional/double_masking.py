"""PatchCleanser (Xiang et al., USENIX Security 2022): double masking, certifiably robust against one adversarial
patch for any image classifier, as pure tensor functions.

A mask set R (§4.3) is built so that every m×m patch position lies inside at least one mask ("R-covering"). The
image is classified under every one mask (first round) and every pair of masks (second round); Algorithm 1 turns the
one- and two-mask predictions into a prediction, and Theorem 1 certifies an image whose two-mask predictions (every
r0, r1 ∈ R, r0 = r1 included) all equal its label: whatever the patch, some mask covers it, and the argument below
Algorithm 1 shows that the defended prediction is then the label.

Masks are (M, H, W) with 1 = pixel kept, 0 = masked — the convention of ``lit_robust.functional.ablations``, so any model's
``ablated_logits(images, masks)`` (``SmoothedClassifier``: masked pixels black, then the declared normalisation;
``SmoothedViT``: the same with its mask channel, token dropping of fully masked tokens) is the masked forward pass.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from lit_robust.functional.derandomized_smoothing import smoothed_prediction, vote_counts

CASES = ("agreed", "disagreer", "majority")  # Algorithm 1's three ways out, recorded per image


def mask_positions(side: int, patch_size: int, k: int) -> tuple[int, list[int]]:
    """Mask width and start positions along one image side (§4.3): stride s = ⌈(n − p + 1)/k⌉, mask width
    p + s − 1 (so two neighbouring masks overlap by p − 1 pixels and every p-pixel window lies inside one), starts
    0, s, 2s, … ≤ n − w, plus n − w when the stride does not land there. At most k masks per side."""
    if not 1 <= patch_size <= side:
        raise ValueError(f"patch size {patch_size} does not fit an image side of {side}: use 1 ≤ m ≤ {side}")
    if k < 1:
        raise ValueError(f"PatchCleanser k={k}: use k ≥ 1 masks per image side")
    stride = math.ceil((side - patch_size + 1) / k)
    width = min(patch_size + stride - 1, side)
    starts = list(range(0, side - width + 1, stride))
    if (side - width) % stride:
        starts.append(side - width)
    return width, starts


def mask_set(size: tuple[int, int], patch_size: int, k: int) -> torch.Tensor:
    """The R-covering mask set R (§4.3) for an m×m patch: masks (|R|, H, W), 1 kept, 0 masked, |R| ≤ k², row-major
    over the k×k grid of mask positions."""
    bands = []
    for side in size:
        width, starts = mask_positions(side, patch_size, k)
        grid = torch.arange(side)
        starts = torch.tensor(starts)[:, None]
        bands.append((grid >= starts) & (grid < starts + width))  # (k_side, side): True inside the mask
    rows, cols = bands
    return (~(rows[:, None, :, None] & cols[None, :, None, :])).flatten(0, 1).float()


def mask_pairs(count: int, device=None) -> torch.Tensor:
    """Indices (P, 2) of every unordered pair (i ≤ j) of masks: the diagonal is the first round (x ⊙ r_i ⊙ r_i =
    x ⊙ r_i), the rest the second round; the table is symmetric, so (j, i) is never run."""
    return torch.triu_indices(count, count, device=device).T


def masked_prediction_table(masked_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            images: torch.Tensor, masks: torch.Tensor, max_images: int = 4096) -> torch.Tensor:
    """Predictions (N, |R|, |R|): entry (i, j) is F(x ⊙ r_i ⊙ r_j), the diagonal the one-mask predictions.

    All |R|(|R| + 1)/2 distinct maskings of all N images go through ``masked_logits(images, masks)`` → (N, A, K) as
    stacked batches of at most ``max_images`` masked images (the model may split them further)."""
    count = masks.shape[0]
    pairs = mask_pairs(count, masks.device)
    doubled = masks[pairs[:, 0]] * masks[pairs[:, 1]]  # (P, H, W)
    per_call = max(1, max_images // max(1, images.shape[0]))
    predictions = torch.cat([masked_logits(images, part).argmax(-1) for part in doubled.split(per_call)], dim=1)
    table = predictions.new_empty(images.shape[0], count, count)
    table[:, pairs[:, 0], pairs[:, 1]] = predictions
    table[:, pairs[:, 1], pairs[:, 0]] = predictions
    return table


def certified(table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Theorem 1: every two-mask prediction (N, |R|, |R|) equals the label (N,) — then Algorithm 1 returns the label
    for the image under any patch that R covers."""
    return (table == targets[:, None, None]).flatten(1).all(1)


def double_masking(table: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 on a prediction table (N, |R|, |R|): (predictions (N,), cases (N,) indexing :data:`CASES`).

    Case I, agreed: every one-mask prediction equals the majority ȳ → ȳ. Case II, disagreer: the first mask r0
    (in R's order, as the loop of Algorithm 1) whose one-mask prediction ŷ0 ≠ ȳ and whose second round agrees,
    F(x ⊙ r0 ⊙ r1) = ŷ0 for every r1 → ŷ0. Case III, otherwise → ȳ. The majority breaks ties towards the lowest class
    index (``smoothed_prediction``; the reference takes the first prediction met). Soundness (§4.2): if the image is
    certified and r* covers the patch, a disagreer that predicts another label is refuted by its pair with r*, and r*
    itself, when it disagrees, is confirmed; so cases II and III both return the label."""
    first = table.diagonal(dim1=1, dim2=2)  # (N, |R|)
    majority = smoothed_prediction(vote_counts(first, num_classes))
    disagrees = first != majority[:, None]
    confirmed = disagrees & (table == first[:, :, None]).all(2)  # (N, |R|)
    first_confirmed = confirmed.long().argmax(1)  # first True (0 when none; then unused)
    confirmed_label = first.gather(1, first_confirmed[:, None]).squeeze(1)
    has_confirmed = confirmed.any(1)
    predictions = torch.where(has_confirmed, confirmed_label, majority)
    cases = torch.where(~disagrees.any(1), 0, torch.where(has_confirmed, 1, 2))
    return predictions, cases


def patchcleanser_outcomes(masked_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                           targets: torch.Tensor, masks: torch.Tensor, num_classes: int,
                           max_images: int = 4096) -> torch.Tensor:
    """Per image (N, 3): Algorithm 1's prediction, whether Theorem 1 certifies the label, and the case."""
    table = masked_prediction_table(masked_logits, images, masks, max_images)
    predictions, cases = double_masking(table, num_classes)
    return torch.stack([predictions, certified(table, targets.to(table.device)).long(), cases], dim=1)
