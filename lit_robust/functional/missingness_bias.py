"""Missingness bias (thesis 001 ch. 5): remove image regions in some order and see what the model then predicts.

A CNN can only approximate a missing region by blacking it out; a ViT can drop the region's tokens (§5.1.2,
App. E.2). Regions are the p×p patches of a grid (p = the ViT's patch size, so one region is one token); the removal
order is random, least salient first or most salient first, the salience of a region being the mean of a
gradient saliency map over it (App. E.1.3). Pure tensor functions, batched over images × removal fractions; the
callback (``lit_robust.callbacks.MissingnessReport``) and the benchmark build on them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lit_robust.functional.ablations import tokens_touched
from lit_robust.functional.vit_tokens import check_droppable_vit, logits_of_kept_tokens

ORDERS = ("random", "least_salient", "most_salient")
MODES = ("blackout", "drop_tokens")
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gradient_saliency(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """|∂ logit of the predicted class / ∂ pixel|, the largest over channels (Simonyan et al. 2013): (N, H, W)."""
    x = images.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        chosen = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(chosen, x)
    return grad.abs().amax(1)


def region_scores(saliency: torch.Tensor, region: int) -> torch.Tensor:
    """Salience of each region (N, R): the mean of the saliency map over it, regions row-major."""
    return F.avg_pool2d(saliency[:, None], region).flatten(1)


def removal_order(scores: torch.Tensor, order: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Regions (N, R) in the order they are removed: random, least salient first or most salient first."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: use one of {ORDERS}")
    if order == "random":
        keys = torch.rand(scores.shape, generator=generator).to(scores.device)
        return keys.argsort(1)
    return torch.argsort(scores, dim=1, descending=order == "most_salient", stable=True)


def removed_counts(num_regions: int, fractions: Sequence[float]) -> list[int]:
    """How many regions each removal fraction removes (rounded to the nearest region)."""
    if any(not 0 <= f <= 1 for f in fractions):
        raise ValueError(f"fractions={list(fractions)}: each must lie in [0, 1]")
    return [round(f * num_regions) for f in fractions]


def blackout_logits(model: nn.Module, colour: torch.Tensor | None = None) -> LogitsFn:
    """Missingness as a baseline colour: the model on [0, 1] images with the removed pixels set to ``colour`` (C,)
    in [0, 1], black by default."""
    def logits(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        keep = keep[:, None]
        if colour is None:
            return model(images * keep)
        return model(images * keep + colour.to(images).view(1, -1, 1, 1) * (1 - keep))

    return logits


def dropped_token_logits(vit: nn.Module, normalise: Callable[[torch.Tensor], torch.Tensor]) -> LogitsFn:
    """Missingness as dropped tokens: a token goes when any of its pixels is removed (App. E.2). Every image of a
    call must keep the same number of tokens (equal removal counts do), so the batch stays one dense tensor."""
    check_droppable_vit(vit)
    patch = vit.patch_embed.proj.kernel_size[0]

    def logits(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        kept = ~tokens_touched(1 - keep, patch)  # (B, T)
        counts = kept.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("dropping tokens needs the same number of kept tokens in every image of a batch")
        index = torch.nonzero(kept)[:, 1].view(len(images), -1)
        tokens = vit.patch_embed(normalise(images))  # (B, T, D)
        tokens = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
        return logits_of_kept_tokens(vit, tokens, index)

    return logits


def removal_predictions(logits: LogitsFn, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Predicted classes (N, F) of every image under each of its F keep-masks, one stacked pass per fraction (all
    images of a fraction keep as many regions, which dropped tokens need)."""
    return torch.stack([logits(images, keep[:, f]).argmax(-1) for f in range(keep.shape[1])], dim=1)


def missingness_statistics(predictions: torch.Tensor, original: torch.Tensor, num_classes: int) -> dict:
    """Per removal fraction (columns of ``predictions``): the share of images whose prediction is unchanged from
    ``original`` (Fig. 5.4), the share predicted as each class and that distribution's entropy in nats (Fig. 5.3)."""
    unchanged = (predictions == original[:, None]).float().mean(0)
    shares = F.one_hot(predictions, num_classes).float().mean(0)  # (F, K)
    entropy = -(shares * shares.clamp_min(1e-12).log()).sum(1)
    return {"unchanged": unchanged, "class_shares": shares, "entropy": entropy}
