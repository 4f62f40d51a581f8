"""Eq. 7.1 of Salman 2023, ASR = Pr[C(T(x)) ≠ y | C(x) = y], against a hand count on a fixed fake classifier."""
import math

import pytest
import torch

from lit_robust.functional.bias_transfer import bias_asr, bias_asr_counts

# Each fake image holds (its clean prediction, its triggered prediction, whether it is triggered) in three pixels.
LABELS = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
CLEAN = torch.tensor([0, 1, 2, 3, 4, 1, 2, 2, 0, 4])      # right on 0, 1, 2, 3, 4, 7, 9: 7 images
TRIGGERED = torch.tensor([0, 3, 2, 0, 4, 3, 1, 1, 0, 0])  # of those, wrong once triggered: 1, 3, 7, 9: 4 images
# Among the clean mistakes, 5 and 8 stay wrong and 6 becomes right: none of them counts either way.


def fake_classifier(images: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is pixel 0 for a clean image and pixel 1 once pixel 2 (the trigger) is set."""
    pixels = images.flatten(1)
    prediction = torch.where(pixels[:, 2] > 0, pixels[:, 1], pixels[:, 0]).long()
    return torch.nn.functional.one_hot(prediction, 5).float()


def set_trigger(images: torch.Tensor) -> torch.Tensor:
    triggered = images.clone()
    triggered.view(len(images), -1)[:, 2] = 1.0
    return triggered


IMAGES = torch.stack([CLEAN.float(), TRIGGERED.float(), torch.zeros(10)], 1).view(10, 1, 1, 3)


@pytest.mark.parametrize("batch_size", [1, 3, 10, 64])
def test_asr_is_the_share_of_correct_images_the_trigger_makes_wrong_in_any_batching(batch_size):
    """4 of the 7 correctly classified images flip: 4/7, in batches of any size. The unconditional flip rate over all
    images would be 6/10 (what a stub that ignores C(x) = y gives); no trigger gives 0."""
    flipped, correct = bias_asr_counts(fake_classifier, IMAGES, LABELS, set_trigger, batch_size=batch_size)
    assert (int(flipped), int(correct)) == (4, 7)
    assert bias_asr(flipped, correct) == pytest.approx(4 / 7)
    assert int(bias_asr_counts(fake_classifier, IMAGES, LABELS, lambda x: x)[0]) == 0


def test_images_the_model_already_gets_wrong_do_not_count():
    """Only the clean mistakes (5, 6, 8): nothing is correct, so nothing can flip and the rate is undefined (NaN),
    although the triggered predictions of 5 and 8 are wrong."""
    wrong = torch.tensor([5, 6, 8])
    flipped, correct = bias_asr_counts(fake_classifier, IMAGES[wrong], LABELS[wrong], set_trigger, batch_size=2)
    assert (int(flipped), int(correct)) == (0, 0) and math.isnan(bias_asr(flipped, correct))


def test_shard_counts_add_up_to_the_whole():
    """Counts of two shards sum to the counts of their union (how the callback combines ranks and batches)."""
    first = bias_asr_counts(fake_classifier, IMAGES[:4], LABELS[:4], set_trigger)
    second = bias_asr_counts(fake_classifier, IMAGES[4:], LABELS[4:], set_trigger)
    assert (int(first[0] + second[0]), int(first[1] + second[1])) == (4, 7)


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="batch_size=0"):
        bias_asr_counts(fake_classifier, IMAGES, LABELS, set_trigger, batch_size=0)
