"""The hot loops of crafting, purification and certification never read a tensor back to the host per step: on a
GPU each such read (``.item()``, ``.cpu()``, ``.tolist()``, ``float(t)``) stalls the device. Counted on CPU by
wrapping those tensor methods: the count must not grow with the number of steps (a per-step read makes it grow).
Reads made inside ``torch.optim`` are not counted: the optimisers' step counters live on the host on a GPU too
(``capturable=False``), so reading them costs no device sync."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import pytest
import torch

from lit_robust import EBM, ImageClassifier
from lit_robust.functional.ablations import ablation_masks, ablation_positions
from lit_robust.functional.derandomized_smoothing import ablation_votes
from lit_robust.functional.double_masking import mask_set, patchcleanser_outcomes
from lit_robust.models.smoothed_classifier import SmoothedClassifier
from lit_robust.poisons.bullseye import collide_features
from lit_robust.poisons.gradient_matching import match_gradients
from lit_robust.poisons.narcissus import synthesize_trigger

READS = ("item", "cpu", "tolist", "__float__", "__int__", "__bool__")


@contextmanager
def counting_host_reads():
    counts = {"reads": 0}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(original):
        def counted(self, *args, **kwargs):
            if not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.optim"):
                counts["reads"] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def reads_for(run, steps_pair=(2, 6)) -> list[int]:
    totals = []
    for steps in steps_pair:
        torch.manual_seed(0)
        with counting_host_reads() as counts:
            run(steps)
        totals.append(counts["reads"])
    return totals


def tiny_classifier() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(backbone="small_cnn", num_classes=3, in_chans=1)


@pytest.mark.parametrize("crafting", ["narcissus", "bullseye", "gradient_matching"])
def test_crafting_loops_read_nothing_back_per_step(crafting):
    images, model = torch.rand(6, 1, 8, 8), tiny_classifier()
    runs = {
        "narcissus": lambda steps: synthesize_trigger(model, images, 1, 0.1, steps, batch_size=4, progress=False),
        "bullseye": lambda steps: collide_features(model, images, images[0], 0.1, steps=steps, progress=False),
        "gradient_matching": lambda steps: match_gradients(model, images, torch.zeros(6, dtype=torch.long), images[0],
                                                           1, 0.1, restarts=1, steps=steps, max_shift=0,
                                                           progress=False),
    }
    few, many = reads_for(runs[crafting])
    assert few == many, f"{crafting}: {many - few} host reads for 4 more steps"


def test_purification_chain_reads_nothing_back_per_step():
    torch.manual_seed(0)
    ebm = EBM(img_size=8, channels=(4, 8), down=(True, False), bank_size=4).eval()
    images = torch.rand(5, 1, 8, 8)
    few, many = reads_for(lambda steps: ebm.purify(images, steps, generator=torch.Generator().manual_seed(0)))
    assert few == many


def test_certification_votes_read_nothing_back_per_ablation_batch():
    classifier = SmoothedClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), max_batch=4)
    images = torch.rand(3, 1, 8, 8)

    def votes(width):  # more positions → more forward batches of the same size
        masks = ablation_masks("column", ablation_positions("column", (8, 8), width, 1), (8, 8), width)
        return ablation_votes(classifier.ablated_logits, images, masks[: 2 * width], 3)

    few, many = reads_for(votes, (2, 4))
    assert few == many


def test_patchcleanser_reads_nothing_back_per_mask_chunk():
    classifier = SmoothedClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), max_batch=4)
    images, targets = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])

    def outcomes(k):  # a larger k → more masks, more chunks of 6 masked images
        return patchcleanser_outcomes(classifier.ablated_logits, images, targets, mask_set((8, 8), 2, k), 3, 6)

    few, many = reads_for(outcomes, (2, 4))
    assert few == many
