"""Baseline filters (spectral signatures, activation clustering, ITLM) on features with a planted outlier group."""
import pytest
import torch

from lit_robust.functional.backdoor_filters import (activation_clustering_keep, keep_below_top_fraction,
                                                    poisoned_model_features, spectral_signature_scores,
                                                    trimmed_loss_keep)


def planted_features(n_per_class=100, planted=8, seed=0):
    """Two classes of isotropic features; class 1 hides `planted` samples shifted along one direction."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(2 * n_per_class) % 2
    features = torch.randn(2 * n_per_class, 16, generator=generator)
    is_planted = torch.zeros(len(labels), dtype=torch.bool)
    is_planted[(labels == 1).nonzero().squeeze(1)[:planted]] = True
    features[is_planted, 3] += 8.0
    return features, labels, is_planted


def test_spectral_signatures_rank_the_planted_group_first():
    features, labels, is_planted = planted_features()
    scores = spectral_signature_scores(features, labels)
    assert set(torch.topk(scores * (labels == 1), 8).indices.tolist()) == set(is_planted.nonzero().squeeze(1).tolist())
    keep = keep_below_top_fraction(scores, labels, 0.12)  # 1.5 × the 8 % planted
    assert not keep[is_planted].any() and (~keep).sum() == 24  # ceil(0.12 * 100) per class


def test_keep_below_top_fraction_rejects_bad_fraction():
    with pytest.raises(ValueError, match="removal fraction"):
        keep_below_top_fraction(torch.zeros(4), torch.zeros(4, dtype=torch.long), 1.0)


def test_activation_clustering_removes_the_small_cluster_only():
    features, labels, is_planted = planted_features()
    keep = activation_clustering_keep(features.relu() + features.abs(), labels)
    assert not keep[is_planted].any()
    assert keep[~is_planted].float().mean() > 0.95


def test_itlm_trims_flipped_labels():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    inputs = torch.randn(400, 5, generator=generator) * 0.3 + labels[:, None].float() * 2 - 1
    noisy = labels.clone()
    noisy[:20] = 1 - noisy[:20]
    keep = trimmed_loss_keep(inputs, noisy, 2, keep_fraction=0.95, rounds=2, first_epochs=5, epochs=3, hidden=16,
                             lr=1e-2, generator=generator)
    assert keep.sum() == 380 and not keep[:20].any()
    features = poisoned_model_features(inputs, labels, 2, epochs=1, hidden=16, generator=generator)
    assert features.shape == (400, 16)
