"""Unadversarial examples (Salman et al. 2021, "Unadversarial examples: designing objects for robust vision";
thesis 001 ch. 3): a per-class pattern δ_y put onto the object and optimised so that a *fixed* classifier recognises
it more easily, δ = argmin_δ L(f(x + δ), y) (Eq. 3.2) — PGD's objective with the sign flipped, minimised instead of
maximised. Two carriers of δ on images in [0, 1]:

- a **texture**: a per-class image T_y that replaces the object's own pixels, those of its stroke mask
  (x > ``threshold``; the 2D form of the thesis' 3D textures, which recolour the object's surface);
- a **patch**: a per-class p×p image pasted at a per-image position (the thesis' sticker, §3.2).

Baselines use the same carriers with other contents (none, random, the best training image of the class), so every
row of a comparison differs only in what the carrier holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STROKE_THRESHOLD = 0.3


def stroke_mask(images: torch.Tensor, threshold: float = STROKE_THRESHOLD) -> torch.Tensor:
    """1 on the object's pixels (any channel above ``threshold``: the digit's stroke on a dark background), else 0,
    shaped (N, 1, H, W) to broadcast over channels."""
    return (images.amax(dim=1, keepdim=True) > threshold).to(images.dtype)


def apply_texture(images: torch.Tensor, texture_labels: torch.Tensor, textures: torch.Tensor,
                  threshold: float = STROKE_THRESHOLD) -> torch.Tensor:
    """x' = m ⊙ T_c + (1 − m) ⊙ x: the texture of class ``texture_labels[i]`` on image i's stroke mask m (the object
    keeps its shape, its surface is redesigned); differentiable in ``textures`` (K, C, H, W)."""
    if textures.shape[1:] != images.shape[1:]:
        raise ValueError(f"textures of shape {tuple(textures.shape[1:])} for images {tuple(images.shape[1:])}: "
                         "a texture covers the whole image, (num_classes, C, H, W)")
    mask = stroke_mask(images, threshold)
    return mask * textures[texture_labels] + (1 - mask) * images


def corner_positions(num_images: int, image_size: tuple[int, int], patch_size: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 2) top-left (row, column) of a p×p patch in one of the four corners, drawn per image: on centred digits
    the corners are the background, so the patch adds a cue without occluding the object."""
    h, w = image_size
    if patch_size > min(h, w):
        raise ValueError(f"patch_size={patch_size} is larger than the images ({h}×{w}): use at most {min(h, w)}")
    corners = torch.tensor([[0, 0], [0, w - patch_size], [h - patch_size, 0], [h - patch_size, w - patch_size]])
    return corners[torch.randint(4, (num_images,), generator=generator)]


def apply_patch(images: torch.Tensor, patch_labels: torch.Tensor, patches: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """Image i with the patch of class ``patch_labels[i]`` pasted at ``positions[i]`` (top-left row, column), all
    images at once; differentiable in ``patches`` (K, C, p, p)."""
    n, c = images.shape[:2]
    p = patches.shape[-1]
    offsets = torch.arange(p, device=images.device)
    rows = (positions[:, 0].to(images.device)[:, None] + offsets)[:, None, :, None]
    cols = (positions[:, 1].to(images.device)[:, None] + offsets)[:, None, None, :]
    index = (torch.arange(n, device=images.device)[:, None, None, None],
             torch.arange(c, device=images.device)[None, :, None, None], rows, cols)
    return images.index_put(index, patches[patch_labels])


def unadversarial_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 3.2's objective, per sample: the cross-entropy of the true class, *minimised* over the pattern (the
    adversarial attack maximises the same loss)."""
    return F.cross_entropy(logits, labels, reduction="none")


def conflicting_labels(labels: torch.Tensor, num_classes: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """A class other than ``labels[i]`` for each image, uniform over the other K − 1: the pattern of a different
    class put onto the object (the thesis' conflicting-patch test, §3.3)."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
    return (labels + shift) % num_classes


def best_per_class(labels: torch.Tensor, losses: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class, the index of its lowest-loss item (the thesis' "best training image" baseline, §3.3): (K,)."""
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"no image of classes {missing} to pick a best image from: pass more images")
    masked = torch.where(labels[None, :] == torch.arange(num_classes, device=labels.device)[:, None],
                         losses[None, :], torch.inf)
    return masked.argmin(dim=1)
