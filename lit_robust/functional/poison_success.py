"""Poison success as torchmetrics (state = sums, so they are exact across DDP ranks and unpadded eval shards).

Thesis 000 App. D.3.2: Eq. D.4, triggerless success PSR_notr(F, i) = 1[F(x_i^π) = y_i^adv] (one target image per
experiment, averaged over experiments); Eq. D.5, triggered success PSR_tr(F, y^π) = mean over test images *not of the
target class* of 1[F(x + ρ^π) = y^π].
"""
from __future__ import annotations

import torch
from torchmetrics import Metric


def attack_success_counts(preds: torch.Tensor, labels: torch.Tensor, target_class: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. D.5 numerator and denominator: triggered images classified as ``target_class`` among those whose true
    label is not ``target_class`` (those are excluded: predicting their own class is no success)."""
    keep = labels != target_class
    return (preds[keep] == target_class).sum(), keep.sum()


def targeted_success_counts(preds: torch.Tensor, adversarial_labels: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. D.4 summed over targets: how many target images are classified as their adversarial class, of how many."""
    return (preds == adversarial_labels).sum(), torch.tensor(len(preds), device=preds.device)


def _as_preds(preds_or_logits: torch.Tensor) -> torch.Tensor:
    return preds_or_logits.argmax(-1) if preds_or_logits.ndim == 2 else preds_or_logits


class _RatioMetric(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def compute(self) -> torch.Tensor:
        """hits / total (NaN when nothing was counted)."""
        return self.hits.float() / self.total if self.total > 0 else torch.tensor(float("nan"))


class AttackSuccessRate(_RatioMetric):
    """Triggered attack success (Eq. D.5); ``update(preds or logits, true labels of the triggered images)``."""

    def __init__(self, target_class: int, **kwargs):
        super().__init__(**kwargs)
        self.target_class = int(target_class)

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        hits, total = attack_success_counts(_as_preds(preds), labels, self.target_class)
        self.hits += hits
        self.total += total


class TargetedPoisonSuccess(_RatioMetric):
    """Triggerless targeted success (Eq. D.4) over target images; ``update(preds or logits, adversarial labels)``."""

    def update(self, preds: torch.Tensor, adversarial_labels: torch.Tensor) -> None:
        hits, total = targeted_success_counts(_as_preds(preds), adversarial_labels)
        self.hits += hits
        self.total += total


def defense_effectiveness_rating(acc_undefended: float, asr_undefended: float, acc_defended: float,
                                 asr_defended: float) -> float:
    """BackdoorBench's defense effectiveness rating (Zhu et al., FT-SAM, ICCV 2023, Eq. 7; the DER column of
    BackdoorBench's defence tables): DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 with ΔASR = ASR_undefended −
    ASR_defended and ΔACC = C-Acc_undefended − C-Acc_defended, all as fractions in [0, 1]. DER ∈ [0, 1]: 1 = ASR from
    1 to 0 without losing clean accuracy, 0.5 = nothing changed (or equal gains and losses); gains in C-Acc and rises
    in ASR are clipped to 0. Multiply by 100 for the papers' percentage tables."""
    for name, value in (("acc_undefended", acc_undefended), ("asr_undefended", asr_undefended),
                        ("acc_defended", acc_defended), ("asr_defended", asr_defended)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r}: DER takes accuracies and attack success as fractions in [0, 1]")
    delta_asr, delta_acc = asr_undefended - asr_defended, acc_undefended - acc_defended
    return (max(0.0, delta_asr) - max(0.0, delta_acc) + 1.0) / 2.0
