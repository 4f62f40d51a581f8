import pytest
import torch

from lit_robust.poisons import CraftingData, apply_trigger, attack_defaults, craft_badnets
from lit_robust.poisons.badnets import badnets_trigger, trigger_shape
from lit_robust.poisons.crafted import additive_trigger, project_linf


def _data(n=200, size=8, classes=4):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    return CraftingData(torch.rand(n, 1, size, size, generator=g), labels, torch.rand(40, 1, size, size, generator=g),
                        torch.arange(40) % classes, classes)


def test_trigger_shapes_footprints():
    assert trigger_shape("pixel", 3).sum() == 1
    assert trigger_shape("patch", 3).sum() == 9
    assert trigger_shape("L", 3).sum() == 5
    assert trigger_shape("X", 3).sum() == 5
    with pytest.raises(ValueError, match="shape"):
        trigger_shape("star", 3)


def test_badnets_trigger_position_bounds_and_random_position_visible():
    with pytest.raises(ValueError, match="outside"):
        badnets_trigger((1, 8, 8), "X", 3, position=(6, 0), value=1.0)
    for seed in range(20):
        trig = badnets_trigger((3, 8, 8), "X", 3, generator=torch.Generator().manual_seed(seed))
        assert trig["mask"].sum() == 5  # whole shape visible wherever it lands
        assert trig["pattern"].shape == (3, 8, 8)


def test_craft_badnets_budget_labels_and_stamp():
    data = _data()
    p = craft_badnets(data, source_class=1, target_class=2, fraction=0.2, shape="patch", size=2, position=(0, 0),
                      value=1.0, generator=torch.Generator().manual_seed(0))
    assert len(p.indices) == round(0.2 * 50) and len(p.indices.unique()) == len(p.indices)
    assert (data.train_labels[p.indices] == 1).all() and (p.labels == 2).all()
    assert (p.images[:, :, :2, :2] == 1).all()
    assert torch.equal(p.images[:, :, 2:, :], data.train_images[p.indices][:, :, 2:, :])
    with pytest.raises(ValueError, match="both"):
        craft_badnets(data, source_class=1, target_class=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="fraction"):
        craft_badnets(data, source_class=1, target_class=2, fraction=1.5, generator=torch.Generator())


def test_apply_trigger_multiplier_and_additive_bounds():
    x = torch.full((2, 1, 4, 4), 0.5)
    delta = torch.full((1, 4, 4), 0.1)
    assert torch.allclose(additive_trigger(x, delta, 3.0), torch.full_like(x, 0.8))
    assert additive_trigger(x, delta, 10.0).max() == 1.0
    stamp = badnets_trigger((1, 4, 4), "pixel", position=(0, 0), value=1.0)
    assert apply_trigger(x, stamp)[0, 0, 0, 0] == 1.0 and apply_trigger(x, stamp)[0, 0, 1, 1] == 0.5


def test_project_linf_keeps_budget_and_range():
    x = torch.rand(10, 1, 5, 5)
    d = project_linf(torch.randn(10, 1, 5, 5), x, 0.1)
    assert d.abs().max() <= 0.1 + 1e-7 and (x + d).min() >= 0 and (x + d).max() <= 1


def test_attack_defaults_lists_config_values():
    defaults = attack_defaults("badnets")
    assert defaults["fraction"] == 0.1 and "generator" not in defaults
    with pytest.raises(ValueError, match="use one of"):
        attack_defaults("nope")


def test_narcissus_trigger_within_budget_clean_labels_and_margin_falls():
    from lit_robust.datasets import load_digits_source
    from lit_robust.poisons import craft_narcissus

    images, labels = load_digits_source("sklearn8x8")
    data = CraftingData(images[:600], labels[:600], images[600:700], labels[600:700], 10)
    eps = 32 / 255
    p = craft_narcissus(data, target_class=3, eps=eps, fraction=0.5, surrogate_epochs=2, warmup_epochs=1, steps=30,
                        lr=0.05, generator=torch.Generator().manual_seed(0), progress=False)
    n_target = int((data.train_labels == 3).sum())
    assert len(p.indices) == round(0.5 * n_target) == len(p.indices.unique())
    assert torch.equal(p.labels, data.train_labels[p.indices]) and (p.labels == 3).all()
    assert (p.images - data.train_images[p.indices]).abs().max() <= eps + 1e-6
    assert p.images.min() >= 0 and p.images.max() <= 1
    assert p.trigger["delta"].abs().max() <= eps + 1e-7 and p.trigger["delta"].abs().max() > eps / 2
    assert p.info["margin_last"] < p.info["margin_first"]
