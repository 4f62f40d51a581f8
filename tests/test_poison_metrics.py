import math

import pytest
import torch

from lit_robust.functional.poison_success import (AttackSuccessRate, TargetedPoisonSuccess, attack_success_counts,
                                                  defense_effectiveness_rating, targeted_success_counts)


def test_attack_success_excludes_target_class_images():
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    preds = torch.tensor([0, 0, 0, 2, 0, 3])  # both target-class images "succeed" trivially: must not count
    hits, total = attack_success_counts(preds, labels, target_class=0)
    assert (hits.item(), total.item()) == (2, 4)


def test_attack_success_metric_accumulates_logits_and_nan_when_empty():
    metric = AttackSuccessRate(target_class=1)
    assert math.isnan(metric.compute().item())
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    metric.update(logits, torch.tensor([0, 0, 1]))
    metric.update(torch.tensor([1, 1]), torch.tensor([0, 1]))
    # non-target images: 0 (hit), 0 (miss), 0 (hit) → 2 of 3
    assert metric.compute().item() == pytest.approx(2 / 3)


def test_targeted_success_counts_and_metric():
    hits, total = targeted_success_counts(torch.tensor([3, 4, 5]), torch.tensor([3, 0, 5]))
    assert (hits.item(), total.item()) == (2, 3)
    metric = TargetedPoisonSuccess()
    metric.update(torch.tensor([[0.1, 0.9]]), torch.tensor([1]))
    metric.update(torch.tensor([[0.9, 0.1]]), torch.tensor([1]))
    assert metric.compute().item() == 0.5


def test_success_rates_of_one_image_and_of_ranks_merged_as_torchmetrics_syncs_them():
    one = TargetedPoisonSuccess()
    one.update(torch.tensor([2]), torch.tensor([2]))
    assert one.compute().item() == 1.0  # a single target image that succeeded
    ranks = [AttackSuccessRate(target_class=2) for _ in range(2)]
    ranks[0].update(torch.tensor([2, 2, 0]), torch.tensor([0, 2, 1]))  # hit, excluded, miss
    ranks[1].update(torch.tensor([[0.0, 0.0, 9.0], [9.0, 0.0, 0.0]]), torch.tensor([1, 1]))  # hit, miss
    ranks[0].merge_state(ranks[1])
    assert ranks[0].compute().item() == pytest.approx(2 / 4)


def test_defense_effectiveness_rating_matches_backdoorbench():
    # FT-SAM (ICCV 2023) Table 1, BadNets-A2O, fine-tuning: backdoored 91.82 / 93.79, defended 90.29 / 1.70 -> DER 95.28
    assert 100 * defense_effectiveness_rating(0.9182, 0.9379, 0.9029, 0.0170) == pytest.approx(95.28, abs=0.005)
    assert defense_effectiveness_rating(0.9, 1.0, 0.9, 0.0) == 1.0        # ASR 1 -> 0 at no cost
    assert defense_effectiveness_rating(0.9, 0.8, 0.9, 0.8) == 0.5        # nothing changed
    assert defense_effectiveness_rating(0.9, 0.5, 0.95, 0.7) == 0.5       # a C-Acc gain and an ASR rise are clipped
    assert defense_effectiveness_rating(1.0, 0.6, 0.0, 0.6) == 0.0        # C-Acc 1 -> 0, ASR unchanged
    with pytest.raises(ValueError, match="asr_defended=5"):
        defense_effectiveness_rating(0.9, 0.9, 0.9, 5.0)                  # percentages are refused, not misread
