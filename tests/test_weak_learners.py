"""The batched weak learners: members are independent and each learns its own subset."""
import pytest
import torch
import torch.nn.functional as F

from lit_robust.functional.weak_learners import (EnsembleMLP, fit_members, flatten_images, index_sets, member_features,
                                                 member_logits, member_losses)


def blobs(n=200, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    inputs = torch.randn(n, 5, generator=generator) * 0.3 + labels[:, None].float() * 2 - 1
    return inputs, labels


def test_index_sets_pads_and_counts():
    masks = torch.tensor([[True, False, True, True], [False, True, False, False]])
    sets, sizes = index_sets(masks)
    assert sizes.tolist() == [3, 1]
    assert sets[0].tolist() == [0, 2, 3] and sets[1, 0].item() == 1
    with pytest.raises(ValueError, match="empty"):
        index_sets(torch.zeros(1, 3, dtype=torch.bool))


def test_members_do_not_share_gradients():
    model = EnsembleMLP(3, 5, 2, hidden=8)
    inputs, labels = blobs(16)
    logits = model(inputs.expand(3, -1, -1))
    F.cross_entropy(logits[1], labels).backward()
    assert model.w1.grad[[0, 2]].abs().sum() == 0 and model.w1.grad[1].abs().sum() > 0


def test_each_member_learns_its_own_labels():
    inputs, labels = blobs()
    # member 0 sees the true labels, member 1 the flipped ones: each fits what it was given
    both = torch.cat([labels, 1 - labels])
    doubled = torch.cat([inputs, inputs])
    masks = torch.zeros(2, 400, dtype=torch.bool)
    masks[0, :200] = masks[1, 200:] = True
    sets, sizes = index_sets(masks)
    model = fit_members(EnsembleMLP(2, 5, 2, hidden=16), doubled, both, sets, sizes, epochs=5, batch_size=32,
                        lr=1e-2, generator=torch.Generator().manual_seed(0))
    predictions = member_logits(model, inputs).argmax(-1)
    assert (predictions[0] == labels).float().mean() > 0.95
    assert (predictions[1] == 1 - labels).float().mean() > 0.95
    losses = member_losses(model, inputs, labels)
    assert losses.shape == (2, 200) and losses[0].mean() < 0.2 < losses[1].mean()
    assert member_features(model, inputs).shape == (2, 200, 16)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_classes"):
        EnsembleMLP(2, 5, 1)
    with pytest.raises(ValueError, match="3 index sets"):
        fit_members(EnsembleMLP(2, 5, 2), *blobs(), torch.zeros(3, 4, dtype=torch.long))


def test_flatten_images_centres_pixels():
    assert flatten_images(torch.tensor([[[[0.0, 1.0]]]])).tolist() == [[-1.0, 1.0]]
