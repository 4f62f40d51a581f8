"""``ShiftedDataModule``: any ``ImageDataModule`` with a distribution shift on its training and/or test split, plus a
sweep of shifted test sets (deep CAMA 002 §4: train clean, test on shifted digits; the thesis' Pendulum
interventions do(θ = ·), do(sun = ·) with values inside or outside the training range).

A shift is a mapping ``{"name": ..., **arguments}``: image shifts ``translate`` (dx, dy pixels), ``rotate``
(degrees), ``gaussian_noise`` / ``gaussian_blur`` / ``contrast`` (severity 1–5) from ``lit_robust.functional.shifts``, and
``intervene`` (Pendulum only: factor=value pairs, the scene re-rendered from the intervened factors, targets =
the new factors). An optional ``label`` names it in logs (default: name + arguments, e.g. ``translate_dy2``).

OOD pairs (in-distribution vs another dataset) are not built here: ``datamodules/ood.py`` owns them.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from lit_robust.datamodules.base import ImageDataModule
from lit_robust.datamodules.wrapper import WrappedDataModule
from lit_robust.datasets import TensorImageDataset, stack_dataset
from lit_robust.functional.shifts import IMAGE_SHIFTS

STOCHASTIC_SHIFTS = ("gaussian_noise",)


def shift_label(spec: dict) -> str:
    """A log-friendly name of a shift spec."""
    if "label" in spec:
        return str(spec["label"])
    args = "_".join(f"{k}{v:g}" if isinstance(v, (int, float)) else f"{k}{v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}_{args}" if args else spec["name"]


def apply_shift(images: torch.Tensor, targets: torch.Tensor, spec: dict, generator: torch.Generator,
                img_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted (images, targets) for one spec; targets change only for Pendulum interventions."""
    args = {k: v for k, v in spec.items() if k not in ("name", "label")}
    name = spec.get("name")
    if name == "intervene":
        from lit_robust.datamodules.pendulum import intervene, render

        if targets.ndim != 2 or targets.shape[1] != 4:
            raise ValueError("shift 'intervene' needs Pendulum data (targets = 4 causal factors); "
                             f"got targets of shape {tuple(targets.shape)}")
        factors = intervene(targets, **{k: float(v) for k, v in args.items()})
        return render(factors, img_size or images.shape[-1]), factors
    if name not in IMAGE_SHIFTS:
        raise ValueError(f"shift name={name!r}: use one of {sorted(IMAGE_SHIFTS) + ['intervene']}")
    if name in STOCHASTIC_SHIFTS:
        args["generator"] = generator
    return IMAGE_SHIFTS[name](images, **args), targets


class ShiftedDataModule(WrappedDataModule):
    """Wrap ``base`` (never edited): ``train_shift`` applies to the train and validation splits, ``test_shift`` to
    the test split, ``sweep`` lists extra shifted test sets served by ``shifted_test_datasets()`` (name → dataset)
    and evaluated by the ``ShiftSweep`` callback. Shifts are deterministic given ``seed`` (noise is seeded).
    "Train clean, test shifted" = ``train_shift: null`` with a ``test_shift`` or a ``sweep``."""

    def __init__(self, base: ImageDataModule, train_shift: dict | None = None, test_shift: dict | None = None,
                 sweep: Sequence[dict] = (), seed: int | None = None):
        super().__init__(base, seed)
        for spec in [s for s in (train_shift, test_shift, *sweep) if s is not None]:
            if "name" not in spec:
                raise ValueError(f"shift {spec} has no 'name'; e.g. {{name: rotate, degrees: 30}}")
        self.train_shift, self.test_shift, self.sweep = train_shift, test_shift, list(sweep)

    def _shifted(self, dataset: Dataset, spec: dict | None, salt: int) -> Dataset:
        if spec is None:
            return dataset
        images, targets = stack_dataset(dataset)
        generator = torch.Generator().manual_seed(int(self.seed) * 1000 + salt)
        return TensorImageDataset(*apply_shift(images, targets, spec, generator))

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.base.setup(stage)
        self.train_dataset = self._shifted(self.base.train_dataset, self.train_shift, 1)
        self.val_dataset = self._shifted(self.base.val_dataset, self.train_shift, 2)
        self.test_dataset = self._shifted(self.base.test_dataset, self.test_shift, 3)

    def shifted_test_datasets(self) -> dict[str, Dataset]:
        """name → the base's clean test split under each ``sweep`` shift."""
        if self.train_dataset is None:
            raise RuntimeError("ShiftedDataModule.shifted_test_datasets: call setup() first")
        return {shift_label(spec): self._shifted(self.base.test_dataset, spec, 10 + i)
                for i, spec in enumerate(self.sweep)}
