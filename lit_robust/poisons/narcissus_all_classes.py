"""Narcissus on every class at once, the training set of PureEBM-P (thesis 000 §6.4: "100 % of training samples are
poisoned using their respective class' NS poison trigger"; §7.4.2, Table 7.3): each class gets its own trigger,
crafted by :func:`~lit_robust.poisons.narcissus.craft_narcissus` with that class as the target.

``target_class`` is crafted first, from the same generator state as a plain ``narcissus`` attack with the same
parameters and seed, so its trigger is that attack's trigger: a generative model trained on this set has seen
exactly the perturbation it is later asked to remove. It is also the test-time trigger of the returned poisons.
"""
from __future__ import annotations

import inspect

import torch

from lit_robust.poisons.crafted import CraftingData, Poisons
from lit_robust.poisons.narcissus import craft_narcissus


def craft_narcissus_all_classes(data: CraftingData, *, generator: torch.Generator, progress: bool = True,
                                **params) -> Poisons:
    """``craft_narcissus`` for ``target_class`` and then every other class in order (the same keyword parameters,
    listed by its signature); the poisons of all classes merged, sorted by index. ``tensors["deltas"]`` (K, C, H, W)
    holds every class's trigger, row k for class k."""
    first = params.pop("target_class", inspect.signature(craft_narcissus).parameters["target_class"].default)
    classes = [first, *(c for c in range(data.num_classes) if c != first)]
    crafted = {c: craft_narcissus(data, target_class=c, generator=generator, progress=progress, **params)
               for c in classes}
    indices = torch.cat([crafted[c].indices for c in classes])
    order = indices.argsort()
    return Poisons(indices=indices[order], images=torch.cat([crafted[c].images for c in classes])[order],
                   labels=torch.cat([crafted[c].labels for c in classes])[order], target_class=first,
                   trigger=crafted[first].trigger,
                   info={"margin_last": {c: crafted[c].info["margin_last"] for c in range(data.num_classes)}},
                   tensors={"deltas": torch.stack([crafted[c].trigger["delta"] for c in range(data.num_classes)])})


# the config-facing keywords (and their defaults) are Narcissus' own
craft_narcissus_all_classes.__signature__ = inspect.signature(craft_narcissus)
