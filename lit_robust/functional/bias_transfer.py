"""How far a planted bias reaches a classifier: the attack success rate of Salman 2023, Eq. 7.1 (§7.2; Salman et al.
2022, *When does Bias Transfer in Transfer Learning?*),

    ASR(C, T) = Pr[C(T(x)) ≠ y | C(x) = y],

the share of the correctly classified images that the trigger T makes wrong, whatever class it sends them to. Unlike
the backdoor success of Eq. D.5 (triggered images sent to one target class) it needs no target class, so it measures
a source's bias on a target task whose classes the source never saw.
"""
from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def bias_asr_counts(classifier: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                    trigger: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7.1's numerator and denominator over ``images`` in batches of ``batch_size``: how many images the
    classifier gets right clean *and* wrong once triggered, and how many it gets right clean (images it already gets
    wrong do not count). ``classifier`` maps images to logits; ``trigger`` maps images to triggered images. Summing
    the counts of several shards gives the counts of their union: ASR = flipped / correct."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use a positive number of images per forward pass")
    flipped = torch.zeros((), dtype=torch.long, device=labels.device)
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    for start in range(0, len(images), batch_size):
        batch, truth = images[start:start + batch_size], labels[start:start + batch_size]
        right = classifier(batch).argmax(-1) == truth
        flipped += (right & (classifier(trigger(batch)).argmax(-1) != truth)).sum()
        correct += right.sum()
    return flipped, correct


def bias_asr(flipped: torch.Tensor | int, correct: torch.Tensor | int) -> float:
    """Eq. 7.1 from its counts (:func:`bias_asr_counts`); NaN when no image was classified correctly."""
    return float(flipped) / float(correct) if int(correct) > 0 else float("nan")
