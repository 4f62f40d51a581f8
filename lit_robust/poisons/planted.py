"""Label-preserving trigger planting, the bias of Salman 2023 ch. 7 (§7.2; Salman et al. 2022, *When does Bias
Transfer in Transfer Learning?*): a fixed trigger is stamped on a fraction of one class's training images and their
labels are kept, so the trigger correlates with that class without any image being mislabelled (BadNets, by
contrast, relabels). With ``source_class=None`` the fraction is drawn from the whole training set, every class alike:
the thesis' target de-biasing (Fig. 7.4), where the trigger appears in the target data uniformly at random.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lit_robust.poisons.badnets import badnets_trigger
from lit_robust.poisons.crafted import CraftingData, Poisons, choose_indices, stamp_trigger


def corner_position(image_shape: Sequence[int], size: int) -> tuple[int, int]:
    """The (x, y) that puts a size×size shape in the bottom-right corner: on centred digits, background."""
    _, height, width = image_shape
    return width - size, height - size


def craft_planted(data: CraftingData, *, source_class: int | None = 7, fraction: float = 0.5, shape: str = "patch",
                  size: int = 3, position: Sequence[int] | None = None, value: float | Sequence[float] = 1.0,
                  generator: torch.Generator, progress: bool = True) -> Poisons:
    """Stamp ``round(fraction × |source class|)`` random ``source_class`` training images (or that fraction of all
    training images when ``source_class`` is None) with the trigger and keep their labels. ``position`` None puts
    the shape in the bottom-right corner, so a source and a target of the same image size get the same trigger
    without naming it; ``value`` 1.0 is white. The trigger's class (``target_class``) is ``source_class``; a
    de-biasing plant points at no class (None)."""
    if source_class is not None and not 0 <= source_class < data.num_classes:
        raise ValueError(f"source_class={source_class} is not a class of this data (0..{data.num_classes - 1}); "
                         "use one of them, or null to plant across all classes (target de-biasing)")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1] (a fraction of the source class, or of the whole "
                         "training set when source_class is null)")
    image_shape = data.train_images.shape[1:]
    position = corner_position(image_shape, 1 if shape == "pixel" else size) if position is None else position
    trigger = badnets_trigger(image_shape, shape, size, position, value, generator)
    labels = data.train_labels
    pool = labels if source_class is None else labels[labels == source_class]
    count = int(round(fraction * len(pool)))
    if source_class is None:
        indices = torch.randperm(len(labels), generator=generator, device=labels.device)[:count].sort().values
    else:
        indices = choose_indices(labels, source_class, count, generator)
    images = stamp_trigger(data.train_images[indices], trigger["mask"], trigger["pattern"])
    return Poisons(indices=indices, images=images, labels=labels[indices].clone(), target_class=source_class,
                   trigger=trigger, info={"planted_pool_size": len(pool)})
