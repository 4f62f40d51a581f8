"""Batched, on-device image augmentations (no per-sample Python loops): the CIFAR-style random crop with padding
(RandomCrop(size, padding)) and horizontal flips, applied to a whole batch of [0, 1] images at once."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_robust.functional.ablations import keep_masks, region_masks


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate every image by its own integer offset in [-max_shift, max_shift]² with zero fill
    (RandomCrop(size, padding=max_shift) done as one gather over the padded batch)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, [max_shift] * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), device=images.device, generator=generator)
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # (n, h)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)  # (n, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return shifted.permute(0, 3, 1, 2).contiguous()


def random_hflip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip a random half of the batch left-right."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_masking(images: torch.Tensor, masks: torch.Tensor, count: int = 2,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Cutout with the masks a certifier will apply: each image is multiplied by ``count`` masks drawn uniformly, with
    replacement, from ``masks`` (M, H, W; 1 kept) plus the all-ones mask — so a batch mixes whole images and the one-
    and two-mask inputs of PatchCleanser's two rounds (the paper fine-tunes with masks of R for the same reason)."""
    options = torch.cat([masks.new_ones(1, *masks.shape[1:]), masks]).to(images.device, images.dtype)
    draws = torch.randint(0, len(options), (images.shape[0], count), generator=generator).to(images.device)
    return images * options[draws].prod(1)[:, None]


def random_region_removal(images: torch.Tensor, region: int, fraction: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Missingness augmentation (001 App. E.1, after ROAR): black out a random ``fraction`` of each image's
    ``region``×``region`` patches, drawn independently per image (the regions and keep-masks of the missingness
    analysis, in a random order)."""
    regions = region_masks(tuple(images.shape[-2:]), region)
    order = torch.rand(images.shape[0], len(regions), generator=generator).argsort(1).to(images.device)
    keep = keep_masks(order, [round(fraction * len(regions))], regions)[:, 0]
    return images * keep[:, None].to(images.dtype)
