"""Narcissus on every class (PureEBM-P's training set): every training image carries its own class's trigger, labels
unchanged, and the first class's trigger is exactly the plain Narcissus attack's with the same seed."""
import torch

from lit_robust.datasets import load_digits_source
from lit_robust.poisons import CraftingData, attack_defaults, craft_narcissus
from lit_robust.poisons.narcissus_all_classes import craft_narcissus_all_classes

TOY = dict(eps=32 / 255, surrogate_epochs=1, warmup_epochs=1, steps=3, lr=0.05, batch_size=32, progress=False)


def two_class_digits() -> CraftingData:
    images, labels = load_digits_source("sklearn8x8")
    keep = labels < 2
    images, labels = images[keep], labels[keep]
    return CraftingData(images[:200], labels[:200], images[200:260], labels[200:260], 2)


def test_every_image_gets_its_own_classes_trigger_and_the_first_is_plain_narcissus(tmp_path):
    """Catches one trigger shared by all classes, poisons left on the target class only, relabelled images, and a
    first trigger that differs from what ``narcissus`` with the same seed serves the classifier. (The surrogates
    are cached in tmp_path, so the plain attack reuses the first one, as runs sharing a cache do.)"""
    data, toy = two_class_digits(), {**TOY, "surrogate_path": str(tmp_path / "surrogate.pt")}
    p = craft_narcissus_all_classes(data, target_class=1, generator=torch.Generator().manual_seed(0), **toy)
    assert torch.equal(p.indices, torch.arange(200)) and torch.equal(p.labels, data.train_labels)
    deltas = p.tensors["deltas"]
    assert deltas.shape == (2, 1, 8, 8) and deltas.abs().amax() <= TOY["eps"] + 1e-7
    assert (deltas[0] - deltas[1]).abs().max() > 1e-3
    expected = (data.train_images + deltas[data.train_labels]).clamp(0, 1)
    assert torch.allclose(p.images, expected, atol=1e-6)
    plain = craft_narcissus(data, target_class=1, generator=torch.Generator().manual_seed(0), **toy)
    assert torch.equal(p.trigger["delta"], plain.trigger["delta"]) and torch.equal(deltas[1], plain.trigger["delta"])
    assert p.target_class == 1


def test_config_parameters_are_narcissus_own():
    assert attack_defaults("narcissus_all_classes") == attack_defaults("narcissus")
