"""ISPL (Algorithm 2), boosting (Algorithm 1) and the per-sample vote of seed 003, on tensors and on a tiny backdoor."""
import pytest
import torch

from lit_robust.datasets import load_digits_source
from lit_robust.functional.ispl import (ISPLSchedule, annealed_trim_fractions, boost_homogeneous_sets, expansion_sample,
                                        fit_component_learners, ispl_partition, loss_momentum, modal_vote_agrees,
                                        self_training, trim)
from lit_robust.functional.weak_learners import flatten_images


def backdoored_digits(source=7, target=1, fraction=0.2, seed=0, patch=1):
    """scikit-learn's 8×8 digits with a dirty-label trigger (a white ``patch``×``patch`` square in the bottom-right
    corner; one pixel by default) on `fraction` of the source class."""
    images, labels = load_digits_source("sklearn8x8")
    generator = torch.Generator().manual_seed(seed)
    sources = (labels == source).nonzero().squeeze(1)
    poisons = sources[torch.randperm(len(sources), generator=generator)[: round(fraction * len(sources))]]
    images, labels = images.clone(), labels.clone()
    images[poisons, 0, 8 - patch:, 8 - patch:] = 1.0
    labels[poisons] = target
    is_poison = torch.zeros(len(labels), dtype=torch.bool)
    is_poison[poisons] = True
    return images, labels, is_poison


def test_annealed_trim_fractions_follow_appendix_schedule():
    assert annealed_trim_fractions(1 / 8, 5) == pytest.approx([3 / 8, 2 / 8, 1 / 8, 1 / 8, 1 / 8])
    assert annealed_trim_fractions(1 / 2, 4) == pytest.approx([1.0, 1.0, 0.5, 0.5])  # capped at 1


def test_loss_momentum_is_exponential_average():
    smoothed = loss_momentum(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), eta=0.9)
    assert torch.allclose(smoothed, torch.tensor([0.9, 0.2]))


def test_expansion_sample_draws_alpha_of_each_subset():
    subset = torch.zeros(3, 100, dtype=torch.bool)
    subset[0, :40] = subset[1, 60:] = True
    subset[2, ::5] = subset[2, 1::5] = True
    sample = expansion_sample(subset, 0.25, torch.Generator().manual_seed(0))
    assert sample.sum(1).tolist() == [10, 10, 10]
    assert not (sample & ~subset).any()
    with pytest.raises(ValueError, match="equal subset sizes"):
        expansion_sample(torch.tensor([[True, True], [True, False]]), 0.5)


def test_trim_keeps_lowest_losses_and_a_per_class_floor():
    losses = torch.tensor([[0.1, 0.2, 0.3, 5.0, 6.0, 0.05]])
    labels = torch.tensor([0, 0, 0, 1, 1, 0])
    candidates = torch.ones(1, 6, dtype=torch.bool)
    assert trim(losses, candidates, labels, keep=2)[0].tolist() == [True, False, False, False, False, True]
    # a floor of half of each class forces the cheapest class-1 sample in (ceil(0.5 * 2) = 1)
    floored = trim(losses, candidates, labels, keep=3, class_floor=0.5)[0]
    assert floored.tolist() == [True, False, False, True, False, True]
    candidates[0, 5] = False  # non-candidates are never chosen
    assert not trim(losses, candidates, labels, keep=3)[0, 5]
    with pytest.raises(ValueError, match="keep=9"):
        trim(losses, candidates, labels, keep=9)


def test_boost_homogeneous_sets_rejects_the_incompatible_component():
    sizes = torch.tensor([40.0, 30.0, 20.0, 10.0])
    # learners of the three clean sets get clean sets right and the poison set wrong; the poison learner the opposite
    losses = torch.tensor([[0, 3, 2, 9], [4, 0, 2, 9], [4, 3, 0, 9], [35, 25, 18, 0]], dtype=torch.float)
    assert boost_homogeneous_sets(losses, sizes).tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="shape"):
        boost_homogeneous_sets(losses[:3], sizes)


def test_modal_vote_keeps_samples_whose_label_wins():
    predictions = torch.tensor([[0, 1, 2], [0, 1, 1], [0, 2, 1]])
    labels = torch.tensor([0, 2, 1])
    assert modal_vote_agrees(predictions, labels, 3).tolist() == [True, False, True]


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="alpha"):
        ISPLSchedule(alpha=0.0)


def test_ispl_and_boosting_remove_a_pixel_backdoor():
    images, labels, is_poison = backdoored_digits()
    inputs = flatten_images(images)
    generator = torch.Generator().manual_seed(0)
    schedule = ISPLSchedule(rounds=4, learner_epochs=15, self_train_epochs=10, hidden=64, batch_size=32)
    components = ispl_partition(inputs, labels, runs=2, schedule=schedule, num_classes=10, generator=generator)
    assert components.shape == (2, len(labels))
    assert torch.equal(torch.bincount(components[0], minlength=4), torch.bincount(components[1], minlength=4))
    # ISPL pushes the poisons out of the first (most homogeneous) components
    assert (components[:, is_poison] >= 2).float().mean() > 0.8
    predictions = fit_component_learners(inputs, labels, components, schedule, 10, generator)
    keep = self_training(inputs, labels, modal_vote_agrees(predictions, labels, 10, generator), schedule, 10, generator)
    assert (~keep[is_poison]).float().mean() >= 0.8
    assert keep[~is_poison].float().mean() >= 0.85
