"""The pixel space a loader yields and the way back to [0, 1], where every defence and generative model works."""
from __future__ import annotations

from typing import Callable

import torch


class PixelSpace:
    """Maps the loader's images to [0, 1] and back: identity (checked), ``Normalize(mean, std)``, or two callables."""

    def __init__(self, normalization=None, user: str = "the defence"):
        self.user = user
        self.mean = self.std = None
        self.to_unit_fn = self.from_unit_fn = None
        if normalization is None:
            return
        first, second = normalization
        if callable(first) and callable(second):
            self.to_unit_fn, self.from_unit_fn = first, second
        else:
            self.mean = torch.as_tensor(first, dtype=torch.float32).view(-1, 1, 1)
            self.std = torch.as_tensor(second, dtype=torch.float32).view(-1, 1, 1)
            if (self.std <= 0).any():
                raise ValueError(f"{user}: normalization std {second} must be positive")

    @property
    def declared(self) -> bool:
        return self.mean is not None or self.to_unit_fn is not None

    def to_unit(self, images: torch.Tensor, check: bool = True) -> torch.Tensor:
        """[0, 1] images from loader images; refuses values outside [0, 1] (a normalisation not declared, or declared
        wrongly) before any work. ``check=False`` for a model's output images, which may overshoot the range."""
        images = images.float()
        if self.mean is not None:
            images = images * self.std.to(images.device) + self.mean.to(images.device)
        elif self.to_unit_fn is not None:
            images = self.to_unit_fn(images)
        if check:
            self.check_unit(images)
        return images

    def from_unit(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            return (images - self.mean.to(images.device)) / self.std.to(images.device)
        return self.from_unit_fn(images) if self.from_unit_fn is not None else images

    def on_unit(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``function`` of the loader's images (a model, a normaliser) as a function of [0, 1] images."""
        return lambda unit: function(self.from_unit(unit))

    def check_unit(self, images: torch.Tensor, tolerance: float = 1e-3) -> None:
        if not torch.isfinite(images).all():
            raise ValueError(f"{self.user}: the split holds NaN or infinite pixels")
        low, high = images.min().item(), images.max().item()
        if low < -tolerance or high > 1 + tolerance:
            fix = ("the declared normalization does not match the loader's Normalize(mean, std)" if self.declared else
                   "declare the loader's normalisation with normalization=(mean, std) — the values of its "
                   "Normalize — or (to_unit, from_unit) callables")
            raise ValueError(f"{self.user} works on images in [0, 1] but the split's pixels span "
                             f"[{low:.3g}, {high:.3g}]: {fix}")
