"""Random augmentation in a train split, separated so that a defence works on the un-augmented images while the
user's random transforms still run on every read.

A split is augmented when an item read twice differs, or when its dataset's ``transform`` holds a known random
transform (``Random*``, ``ColorJitter``, ``AutoAugment``…; a flip with p = 0.5 may read the same twice). The
``transform`` — on the dataset or behind ``Subset`` / ``random_split`` wrappers — is cut at its first random step:
the steps before it, plus a ``ToTensor`` found later (so that the defence gets tensors), make the deterministic part
applied before the defence; the remaining steps (``RandomAffine``, then ``Normalize``…) run on each read of the
defended tensor (torchvision's geometric and colour transforms accept tensors). E.g. ``RandomAffine → ToTensor →
Normalize``: the defence sees ``ToTensor(raw)`` in [0, 1], each read gives ``Normalize(RandomAffine(defended))``.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset

KNOWN_RANDOM = {"ColorJitter", "GaussianBlur", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix",
                "ElasticTransform", "ScaleJitter"}
TO_TENSOR = "ToTensor"
UNSEPARABLE_FIX = ("make the dataset's `transform` a transforms.Compose in which the random transforms can run on "
                   "tensors (e.g. Compose([RandomCrop(28, padding=2), ToTensor(), Normalize(mean, std)])), or move "
                   "the augmentation out of the dataset (e.g. into your LightningModule's on_after_batch_transfer)")


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Draws made inside (probing transforms) leave torch's, numpy's and Python's generators as they were."""
    python, legacy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        yield
    random.setstate(python)
    np.random.set_state(legacy)


def _same(first, second) -> bool:
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return first.shape == second.shape and torch.equal(first, second)
    try:
        return np.array_equal(np.asarray(first), np.asarray(second))
    except (TypeError, ValueError):
        return first == second


def is_random(step: Callable, sample, tries: int = 3) -> bool:
    """A known random transform, or one whose output on ``sample`` differs between calls."""
    name = type(step).__name__
    if name.startswith("Random") or name in KNOWN_RANDOM:
        return True
    first = step(sample)
    return any(not _same(first, step(sample)) for _ in range(tries))


def reads_differ(dataset: Dataset, image_of: Callable, count: int = 4) -> bool:
    """Whether any of the first ``count`` items gives another image on a second read."""
    with preserved_rng():
        return any(not _same(image_of(dataset[i]), image_of(dataset[i])) for i in range(min(count, len(dataset))))


def transform_owner(dataset: Dataset, depth: int = 8):
    """The dataset whose ``transform`` attribute makes the items, looking through ``Subset``-style wrappers."""
    for _ in range(depth):
        if dataset is None or getattr(dataset, "transform", None) is not None:
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None


class Chain:
    """Transforms applied in order (a ``Compose`` without importing torchvision)."""

    def __init__(self, steps: list):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return " → ".join(type(step).__name__ for step in self.steps) or "identity"


class SeparatedAugmentation:
    """The ``transform`` of ``owner`` cut into the deterministic part (run before the defence) and the random part
    (run on every read after it); :meth:`unaugmented` serves the deterministic items while the defence reads them."""

    def __init__(self, owner: Dataset, deterministic: Chain, augment: Chain):
        self.owner, self.deterministic, self.augment = owner, deterministic, augment

    @property
    def normalizes_after(self) -> bool:
        """Whether ``Normalize`` runs after the defence, so that the un-augmented images are in [0, 1]."""
        return any(type(step).__name__ == "Normalize" for step in self.augment.steps)

    @contextmanager
    def unaugmented(self) -> Iterator[None]:
        transform = self.owner.transform
        self.owner.transform = self.deterministic
        try:
            yield
        finally:
            self.owner.transform = transform


def separate_augmentation(dataset: Dataset, image_of: Callable, user: str) -> SeparatedAugmentation | None:
    """None for a split without random augmentation, else its :class:`SeparatedAugmentation`; refuses (before any
    work, naming how to structure the transform) an augmentation it cannot separate."""
    owner = transform_owner(dataset)
    steps = _steps(owner.transform) if owner is not None else []
    named = any(type(step).__name__.startswith("Random") or type(step).__name__ in KNOWN_RANDOM for step in steps)
    if not (named or reads_differ(dataset, image_of)):
        return None
    if owner is None:
        raise ValueError(f"{user}: the train split's items change between two reads (random augmentation) and no "
                         f"dataset in it has a `transform` attribute to separate it from: {UNSEPARABLE_FIX}")
    with preserved_rng():
        return _cut(owner, steps, dataset, image_of, user)


def _steps(transform) -> list:
    inner = getattr(transform, "transforms", None)
    return list(inner) if isinstance(inner, (list, tuple)) else [transform]


def _cut(owner, steps: list, dataset: Dataset, image_of: Callable, user: str) -> SeparatedAugmentation:
    transform, received = owner.transform, []
    owner.transform = lambda image: received.append(image) or transform(image)
    try:
        dataset[0]  # records the raw image the transform receives
    finally:
        owner.transform = transform
    sample = received[0]
    first = next((k for k, step in enumerate(steps) if is_random(step, Chain(steps[:k])(sample))), None)
    if first is None:
        raise ValueError(f"{user}: the train split's items change between two reads but its transform "
                         f"({Chain(steps)}) gives the same output on every call: the randomness is outside the "
                         f"transform, where it cannot be separated; {UNSEPARABLE_FIX}")
    deterministic, augment = steps[:first], steps[first:]
    to_tensor = next((step for step in augment if type(step).__name__ == TO_TENSOR), None)
    if to_tensor is not None:
        deterministic, augment = deterministic + [to_tensor], [step for step in augment if step is not to_tensor]
    separated = SeparatedAugmentation(owner, Chain(deterministic), Chain(augment))
    problem = _separation_problem(separated, sample, dataset, image_of)
    if problem is not None:
        raise ValueError(f"{user}: the train split is randomly augmented and its transform cannot be cut into a "
                         f"part before the defence and a random part after it ({problem}): {UNSEPARABLE_FIX}")
    return separated


def _separation_problem(separated: SeparatedAugmentation, sample, dataset: Dataset, image_of: Callable) -> str | None:
    """Why the cut does not work, if it does not: the deterministic part must give a tensor, the same on every read,
    and the random part must run on it and give the shape the user's transform gives."""
    base = separated.deterministic(sample)
    if not isinstance(base, torch.Tensor):
        return f"the steps before the first random one ({separated.deterministic}) give a {type(base).__name__}"
    with separated.unaugmented():
        if reads_differ(dataset, image_of):
            return f"the items still change with only {separated.deterministic} applied"
    try:
        served = separated.augment(base)
    except Exception as error:  # noqa: BLE001 — any failure means the order cannot be changed
        return f"{separated.augment} fails on tensors ({type(error).__name__}: {error})"
    if tuple(served.shape) != tuple(image_of(dataset[0]).shape):
        return f"{separated.augment} on tensors gives another shape than the dataset's transform"
    return None
