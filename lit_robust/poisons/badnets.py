"""BadNets dirty-label backdoor as in 003 §6 and App. B.2 (after Gu et al. 2017 and Tran et al. 2018): a small shape
(single pixel, square patch, L or X) of one colour is stamped at a fixed position on a fraction ε of the *source*
class, and those images are relabelled as the *target* class. Success is the triggered source images classified as
the target class (003 Eq. 7; 000 Eq. D.5 restricted to the source class).
"""
from __future__ import annotations

from typing import Sequence

import torch

from lit_robust.poisons.crafted import CraftingData, Poisons, choose_indices, stamp_trigger

TRIGGER_SHAPES = ("pixel", "patch", "L", "X")


def trigger_shape(shape: str, size: int) -> torch.Tensor:
    """The binary footprint (size, size) of a trigger shape (a pixel is 1×1 whatever ``size``)."""
    if shape == "pixel":
        return torch.ones(1, 1)
    if size < 2:
        raise ValueError(f"trigger size {size} is too small for shape {shape!r}; use size ≥ 2 or shape='pixel'")
    if shape == "patch":
        return torch.ones(size, size)
    footprint = torch.zeros(size, size)
    if shape == "L":
        footprint[:, 0] = 1
        footprint[-1, :] = 1
    elif shape == "X":
        idx = torch.arange(size)
        footprint[idx, idx] = 1
        footprint[idx, size - 1 - idx] = 1
    else:
        raise ValueError(f"trigger shape {shape!r}: use one of {TRIGGER_SHAPES}")
    return footprint


def badnets_trigger(image_shape: Sequence[int], shape: str = "pixel", size: int = 3,
                    position: Sequence[int] | None = None, value: float | Sequence[float] | None = None,
                    generator: torch.Generator | None = None) -> dict:
    """A stamp trigger {"kind": "stamp", "mask" (1, H, W), "pattern" (C, H, W), "position" (x, y), "value"}.

    ``position`` is the (x, y) of the shape's top-left corner; None draws one uniformly such that the whole shape is
    visible, and ``value`` None draws one colour uniformly per channel, as 003 App. B.2 does.
    """
    channels, height, width = image_shape
    footprint = trigger_shape(shape, size)
    fh, fw = footprint.shape
    if position is None:
        x = int(torch.randint(0, width - fw + 1, (1,), generator=generator))
        y = int(torch.randint(0, height - fh + 1, (1,), generator=generator))
    else:
        x, y = (int(v) for v in position)
    if not (0 <= x <= width - fw and 0 <= y <= height - fh):
        raise ValueError(f"trigger position {(x, y)} puts a {fw}×{fh} {shape!r} outside the {width}×{height} image; "
                         f"use x in [0, {width - fw}], y in [0, {height - fh}]")
    if value is None:
        colour = torch.rand(channels, generator=generator)
    else:
        colour = torch.as_tensor(value, dtype=torch.float32).flatten().expand(channels).clone()
    mask = torch.zeros(1, height, width)
    mask[0, y:y + fh, x:x + fw] = footprint
    pattern = colour.view(channels, 1, 1).expand(channels, height, width) * mask
    return {"kind": "stamp", "mask": mask, "pattern": pattern.contiguous(), "position": [x, y],
            "value": colour.tolist(), "shape": shape, "size": int(size)}


def craft_badnets(data: CraftingData, *, source_class: int = 1, target_class: int = 7, fraction: float = 0.1,
                  shape: str = "pixel", size: int = 3, position: Sequence[int] | None = None,
                  value: float | Sequence[float] | None = None, generator: torch.Generator, progress: bool = True
                  ) -> Poisons:
    """Stamp ``round(fraction × |source class|)`` random source-class training images and relabel them as the target
    (003 App. B.2: ε = 5, 10, 20 % of the source class)."""
    if source_class == target_class:
        raise ValueError(f"source_class and target_class are both {source_class}; a backdoor needs two classes")
    for name, cls in (("source_class", source_class), ("target_class", target_class)):
        if not 0 <= cls < data.num_classes:
            raise ValueError(f"{name}={cls} is not a class of this data (0..{data.num_classes - 1})")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1] (a fraction of the source class)")
    trigger = badnets_trigger(data.train_images.shape[1:], shape, size, position, value, generator)
    n_source = int((data.train_labels == source_class).sum())
    indices = choose_indices(data.train_labels, source_class, int(round(fraction * n_source)), generator)
    images = stamp_trigger(data.train_images[indices], trigger["mask"], trigger["pattern"])
    labels = torch.full((len(indices),), target_class, dtype=data.train_labels.dtype)
    return Poisons(indices=indices, images=images, labels=labels, target_class=target_class, trigger=trigger,
                   source_class=source_class, info={"source_class_size": n_source})
