"""Image ablations of derandomized smoothing (thesis 001 §1.1.1, App. A.4–A.5): which pixels each ablation keeps, and
which ViT tokens it touches.

An ablation keeps a band of ``width`` columns (``kind="column"``) or a ``width``×``width`` square (``kind="block"``)
starting at a position and **wrapping around** the image edge, so every position is equally likely and an image of
width w has w column ablations (stride 1). Strided ablation sets keep every ``stride``-th position (App. A.4, A.5).
Everything here is a pure tensor function; the models and the certificate (``lit_robust.functional.derandomized_smoothing``) build on it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

ABLATION_KINDS = ("column", "block")


def _check(kind: str, size: tuple[int, int], width: int, stride: int = 1) -> None:
    if kind not in ABLATION_KINDS:
        raise ValueError(f"ablation kind={kind!r}: use one of {ABLATION_KINDS}")
    height, w = size
    limit = min(height, w) if kind == "block" else w
    if not 1 <= width <= limit:
        raise ValueError(f"ablation width={width} does not fit a {height}×{w} image: use 1 ≤ width ≤ image side")
    if stride < 1:
        raise ValueError(f"ablation stride={stride}: use a positive integer")


def ablation_positions(kind: str, size: tuple[int, int], width: int, stride: int = 1) -> torch.Tensor:
    """Start positions (A, 2) as (row, column) of the strided ablation set S_b(x): columns 0, s, 2s, … < w (row 0),
    or the grid of those rows × columns for blocks (App. A.5, "strided block smoothing")."""
    _check(kind, size, width, stride)
    height, w = size
    cols = torch.arange(0, w, stride)
    if kind == "column":
        return torch.stack([torch.zeros_like(cols), cols], dim=1)
    rows = torch.arange(0, height, stride)
    return torch.cartesian_prod(rows, cols)


def ablation_masks(kind: str, positions: torch.Tensor, size: tuple[int, int], width: int) -> torch.Tensor:
    """Masks (A, H, W) of the ablations starting at ``positions`` (A, 2): 1 where the pixel is kept, 0 where ablated;
    the kept band/block wraps around the right (and bottom) edge (§1.1.1)."""
    _check(kind, size, width)
    height, w = size
    positions = torch.as_tensor(positions).long().reshape(-1, 2)
    offsets = torch.arange(width, device=positions.device)
    cols = (positions[:, 1:2] + offsets) % w  # (A, b)
    keep_cols = torch.zeros(len(positions), w, dtype=torch.bool, device=positions.device)
    keep_cols.scatter_(1, cols, True)
    if kind == "column":
        return keep_cols[:, None, :].expand(-1, height, -1).float()
    rows = (positions[:, 0:1] + offsets) % height
    keep_rows = torch.zeros(len(positions), height, dtype=torch.bool, device=positions.device)
    keep_rows.scatter_(1, rows, True)
    return (keep_rows[:, :, None] & keep_cols[:, None, :]).float()


def random_ablation_mask(kind: str, size: tuple[int, int], width: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """One mask (1, H, W) at a uniformly random position, for training on ablations (App. A.1.3). One position per
    batch, as the reference does, keeps the number of tokens a ViT keeps equal across the batch."""
    _check(kind, size, width)
    height, w = size
    row = torch.randint(0, height if kind == "block" else 1, (1,), generator=generator)
    col = torch.randint(0, w, (1,), generator=generator)
    return ablation_masks(kind, torch.stack([row, col], dim=1).to(device), size, width)


def ablate(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Every image under every mask, with the mask as an extra channel: (N, C, H, W) × (A, H, W) → (N, A, C + 1, H, W).

    Ablation happens in [0, 1] pixel space (ablated pixels become 0) and the mask channel (1 kept, 0 ablated) makes an
    ablated pixel distinguishable from a black one — the reference's encoding (the thesis, App. A.1.6, found plain
    zeros enough; the extra channel costs nothing and removes the ambiguity)."""
    if images.dim() != 4 or masks.dim() != 3 or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)}: expected (N, C, H, W) and "
                         f"(A, H, W) with the same H, W")
    masks = masks.to(images.dtype)[None, :, None]  # (1, A, 1, H, W)
    kept = images[:, None] * masks
    return torch.cat([kept, masks.expand(images.shape[0], -1, -1, -1, -1)], dim=2)


def tokens_touched(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Which p×p tokens (A, T) of a ViT each ablation touches: a token is kept iff its patch has any kept pixel
    (Alg. 2, line 4); tokens in row-major order, as timm's patch embedding flattens them."""
    height, w = masks.shape[-2:]
    if height % patch_size or w % patch_size:
        raise ValueError(f"masks of {height}×{w} do not split into {patch_size}×{patch_size} tokens: choose an image "
                         f"size divisible by the patch size")
    return F.max_pool2d(masks[:, None].float(), patch_size).flatten(1) > 0


def group_by_token_count(touched: torch.Tensor) -> list[torch.Tensor]:
    """Indices of the ablations, grouped by how many tokens they keep, so each group runs as one dense tensor.

    Column bands at a stride aligned with the patch size all keep the same count, except the bands that straddle a
    token edge or wrap around the image; blocks straddle in two directions. Grouping handles every case exactly,
    without padding tokens (which would change the attention)."""
    counts = touched.sum(1)
    return [torch.nonzero(counts == c).flatten() for c in torch.unique(counts)]


# ---- regions removed in an order (missingness, 001 ch. 5; missingness augmentation) -------------------------------
def region_masks(size: tuple[int, int], region: int) -> torch.Tensor:
    """Masks (R, H, W) of the p×p regions of the grid, row-major (timm's token order): 1 inside region r."""
    height, width = size
    if height % region or width % region:
        raise ValueError(f"a {height}×{width} image does not split into {region}×{region} regions: choose a region "
                         f"size that divides the image (the ViT's patch size)")
    grid = torch.arange((height // region) * (width // region)).view(1, 1, height // region, width // region)
    cells = F.interpolate(grid.float(), scale_factor=region, mode="nearest").long().view(height, width)
    return (cells[None] == torch.arange(grid.numel())[:, None, None]).float()


def keep_masks(orders: torch.Tensor, counts: Sequence[int], regions: torch.Tensor) -> torch.Tensor:
    """Pixel keep-masks (N, F, H, W): for each image and count c, every region but the first c of its order."""
    rank = orders.argsort(1)  # the step at which each region goes
    removed = rank[:, None, :] < torch.as_tensor(counts, device=orders.device)[None, :, None]  # (N, F, R)
    return 1 - torch.einsum("nfr,rhw->nfhw", removed.float(), regions.to(orders.device))
