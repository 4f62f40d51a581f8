"""What every poisoning attack consumes and produces, and the two ways a trigger is applied.

An attack is a pure function ``craft_<name>(data: CraftingData, *, generator, progress, **params) -> Poisons``: it
sees the clean training and test tensors and returns which training indices it replaces, by what images and labels,
plus the test-time trigger (triggered attacks) or the target image (targeted attacks). The DataModule caches that
result and builds datasets from it; the attack never touches a DataModule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Crafting loops read their loss for the progress bar only every this many steps (a device sync each time).
PROGRESS_EVERY = 25


@dataclass
class CraftingData:
    """Clean tensors an attack may read: images (N, C, H, W) in [0, 1] and class labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


@dataclass
class Poisons:
    """An attack's output.

    ``indices`` (P,) are unique training indices replaced by ``images`` (P, C, H, W) with ``labels`` (P,).
    Triggered attacks set ``trigger`` = {"kind": "stamp", "mask", "pattern"} or {"kind": "additive", "delta"}, and
    ``source_class`` when only one class is meant to flip (BadNets); targeted attacks set ``target_index`` (a test
    image) and ``target_class`` (the adversarial class). A trigger planted on every class alike (target de-biasing,
    ``planted``) points at no class: ``target_class`` None. ``info`` holds JSON-able facts for the manifest (losses,
    restarts), ``tensors`` any other tensors worth caching (a surrogate's weights).
    """

    indices: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    target_class: int | None
    trigger: dict | None = None
    source_class: int | None = None
    target_index: int | None = None
    info: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)

    def to(self, device) -> "Poisons":
        """A copy with every tensor (also inside ``trigger`` and ``tensors``) on ``device``."""
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            return {k: move(v) for k, v in value.items()} if isinstance(value, dict) else value
        return Poisons(**{k: move(v) for k, v in self.__dict__.items()})

    def to_payload(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_payload(cls, payload: dict) -> "Poisons":
        return cls(**payload)


def stamp_trigger(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """τ(x) = (1 − m)·x + m·p: overwrite the masked pixels with the pattern (Gu et al.'s BadNets; 003 §6, App. B.2)."""
    return images * (1 - mask) + mask * pattern


def additive_trigger(images: torch.Tensor, delta: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """x + k·ρ clipped to [0, 1] (Narcissus; 000 Eq. D.5 with k = 1, the Narcissus paper tests with k = 3)."""
    return (images + multiplier * delta).clamp(0.0, 1.0)


def apply_trigger(images: torch.Tensor, trigger: dict, multiplier: float = 1.0) -> torch.Tensor:
    """Apply a stored trigger; for a stamp the multiplier scales the change τ(x) − x (×1 is the plain stamp)."""
    if trigger["kind"] == "additive":
        return additive_trigger(images, trigger["delta"], multiplier)
    if trigger["kind"] == "stamp":
        stamped = stamp_trigger(images, trigger["mask"], trigger["pattern"])
        return stamped if multiplier == 1 else (images + multiplier * (stamped - images)).clamp(0.0, 1.0)
    raise ValueError(f"unknown trigger kind {trigger['kind']!r}: expected 'stamp' or 'additive'")


def project_linf(delta: torch.Tensor, images: torch.Tensor, eps: float) -> torch.Tensor:
    """Project perturbations onto {δ : ‖δ‖∞ ≤ ε, x + δ ∈ [0, 1]} (the constraint set C of 000 §6.3)."""
    delta = delta.clamp(-eps, eps)
    return (images + delta).clamp(0.0, 1.0) - images


def choose_indices(labels: torch.Tensor, cls: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct random indices of images labelled ``cls``, sorted."""
    pool = (labels == cls).nonzero().flatten()
    if count > len(pool):
        raise ValueError(f"asked for {count} poisons of class {cls} but the training set has only {len(pool)}; "
                         "lower the poison fraction/budget")
    return pool[torch.randperm(len(pool), generator=generator)[:count]].sort().values
