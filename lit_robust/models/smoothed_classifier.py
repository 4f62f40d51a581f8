"""Any classifier as the base classifier of derandomized smoothing (thesis 001 §1.1.1), so that
:class:`~lit_robust.callbacks.Certification` certifies a user's own model.

The smoothed classifier g(x) votes over f(ablate(x, m)) for every mask m of the ablation set (Eq. 1.1): ablated pixels
are 0 in [0, 1] space (black), the kept band is the image; the result is mapped into the classifier's input space
(``normalization``) before f. No mask channel is added — ``lit_robust.SmoothedViT`` is the model trained for
ablations; this wrapper certifies whatever model it is given (train it with ablation augmentation for useful numbers).
"""
from __future__ import annotations

import torch
from torch import nn

from lit_robust.machine import stacked_pass_size
from lit_robust.pixel_space import PixelSpace


class SmoothedClassifier(nn.Module):
    """``ablated_logits(images, masks)`` → logits (N, A, K) of ``classifier`` on every [0, 1] image (N, C, H, W)
    under every mask (A, H, W), at most ``max_batch`` ablated images per forward pass (None: chosen by
    device, :func:`lit_robust.machine.stacked_pass_size`).

    Args:
        classifier: any ``nn.Module`` (a LightningModule too) mapping images to logits (B, K).
        normalization: the classifier's input space: ``(mean, std)`` of its ``Normalize``, ``(to_unit, from_unit)``
            callables, or None for [0, 1] inputs.
        ablation, ablation_width, ablation_stride: the ablation set Certification uses (``column`` or ``block``).
    """

    def __init__(self, classifier: nn.Module, normalization=None, ablation: str | None = None,
                 ablation_width: int | None = None, ablation_stride: int = 1, max_batch: int | None = None):
        super().__init__()
        self.classifier, self.max_batch = classifier, max_batch
        self.pixel_space = PixelSpace(normalization, "SmoothedClassifier")
        self.hparams = {"ablation": ablation, "ablation_width": ablation_width, "ablation_stride": ablation_stride}

    def ablated_logits(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        masks = masks.to(images.device, images.dtype)
        n, a = images.shape[0], masks.shape[0]
        ablated = (images[:, None] * masks[None, :, None]).flatten(0, 1)  # (n·a, C, H, W), ablated pixels 0
        logits = torch.cat([self.classifier(self.pixel_space.from_unit(chunk))
                            for chunk in ablated.split(stacked_pass_size(images.device, self.max_batch))])
        return logits.view(n, a, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pixel_space.from_unit(images))
