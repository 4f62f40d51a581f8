import json

import pytest
import torch

from lit_robust.datamodules import DigitsDataModule, PoisonedDataModule
from lit_robust.datasets import stack_dataset

BADNETS = dict(source_class=1, target_class=7, fraction=0.2, shape="patch", size=2, position=(5, 5), value=1.0)


def _dm(tmp_path, seed=0, **params):
    base = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)
    return PoisonedDataModule(base, attack="badnets", params={**BADNETS, **params}, seed=seed,
                              cache_dir=str(tmp_path), progress=False)


def test_manifest_budget_indices_labels_and_file(tmp_path):
    dm = _dm(tmp_path)
    dm.setup("fit")
    base_images, base_labels = stack_dataset(dm.base.train_dataset)
    images, labels = stack_dataset(dm.train_dataset)
    m = dm.manifest
    n_source = int((base_labels == 1).sum())
    assert m["num_poisons"] == round(0.2 * n_source) == len(set(m["poisoned_indices"]))
    idx = torch.tensor(m["poisoned_indices"])
    assert (base_labels[idx] == 1).all() and (labels[idx] == 7).all()
    clean = ~dm.poison_mask
    assert torch.equal(images[clean], base_images[clean]) and torch.equal(labels[clean], base_labels[clean])
    assert m["params"]["fraction"] == 0.2 and m["seed"] == 0 and m["attack"] == "badnets"
    on_disk = json.loads((tmp_path / (dm.manifest["cache"].split("/")[-1].replace(".pt", ".json"))).read_text())
    assert on_disk["checksum"] == m["checksum"] and len(m["checksum"]) == 64
    assert dm.num_classes == 10 and dm.in_chans == 1
    assert dm.train_dataset[0][0].shape == (1, 8, 8) and dm.train_dataset[0][1].ndim == 0


def test_badnets_stamps_the_trigger_on_exactly_the_poisoned_indices(tmp_path):
    """The served train split is the clean one with the 2×2 patch of value 0.5 at x = 1, y = 4 (rows 4–5, columns
    1–2) stamped on, and the label set to 7, at exactly the indices the manifest and ``poison_mask`` record; every
    other image and label is the clean one. Written from the parameters, not from the stored trigger. Catches a
    relabel-only attack (images unchanged), a swapped (x, y), a stamp on the wrong images, and a mask that disagrees
    with the manifest."""
    dm = _dm(tmp_path, position=(1, 4), value=0.5)
    dm.setup()
    base_images, base_labels = stack_dataset(dm.base.train_dataset)
    images, labels = stack_dataset(dm.train_dataset)
    idx = torch.tensor(dm.manifest["poisoned_indices"])
    assert torch.equal(dm.poison_mask.nonzero().flatten(), idx) and len(idx) == dm.manifest["num_poisons"] > 0
    expected_images, expected_labels = base_images.clone(), base_labels.clone()
    expected_images[idx, :, 4:6, 1:3] = 0.5
    expected_labels[idx] = 7
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert (images[idx] != base_images[idx]).flatten(1).any(1).all()   # every poison really carries a visible stamp


def test_narcissus_adds_one_bounded_trigger_to_exactly_the_poisoned_indices(tmp_path):
    """Narcissus (clean label): poisoned images are clip(clean + δ, 0, 1) with the one recorded δ, 0 < ‖δ‖∞ ≤ ε,
    labels unchanged, every other image untouched; the triggered test images get the same δ. An untrained surrogate
    and 3 steps at a large rate (δ reaches the ε-ball) keep it to seconds. Catches poisons left clean, a δ outside
    the ε-ball, a flipped sign (clean − δ), δ added to the wrong images, and a test-time trigger other than the
    training one."""
    eps = 8 / 255
    base = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)
    dm = PoisonedDataModule(base, attack="narcissus", seed=0, cache_dir=str(tmp_path), progress=False, device="cpu",
                            params=dict(target_class=3, eps=eps, fraction=0.5, surrogate_epochs=0, warmup_epochs=0,
                                        steps=3, batch_size=64, lr=50.0))
    dm.setup()
    base_images, base_labels = stack_dataset(dm.base.train_dataset)
    images, labels = stack_dataset(dm.train_dataset)
    idx = torch.tensor(dm.manifest["poisoned_indices"])
    assert torch.equal(dm.poison_mask.nonzero().flatten(), idx)
    assert len(idx) == round(0.5 * int((base_labels == 3).sum())) and (base_labels[idx] == 3).all()
    delta = dm.poisons.trigger["delta"]
    assert delta.shape == (1, 8, 8) and 0 < delta.abs().max() <= eps + 1e-7
    assert dm.manifest["trigger"]["linf"] == pytest.approx(delta.abs().max().item())
    expected = base_images.clone()
    expected[idx] = (base_images[idx] + delta).clamp(0, 1)
    assert torch.equal(images, expected) and torch.equal(labels, base_labels)
    assert not torch.equal(images[idx], base_images[idx])
    test_images, test_labels = dm._test
    triggered = dm.triggered_test_dataset(1.0)
    assert torch.equal(triggered.images, (test_images[test_labels != 3] + delta).clamp(0, 1))


def test_cache_reload_bit_identical_and_corruption_rebuilt(tmp_path):
    first = _dm(tmp_path)
    first.setup()
    cache = tmp_path / first.manifest["cache"].split("/")[-1]
    again = _dm(tmp_path)
    again.setup()
    assert torch.equal(again.train_dataset.images, first.train_dataset.images)
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    cache.write_bytes(bytes(raw))
    rebuilt = _dm(tmp_path)
    rebuilt.setup()  # checksum mismatch → crafted again, same seed → same poisons
    assert torch.equal(rebuilt.train_dataset.images, first.train_dataset.images)
    assert rebuilt.manifest["checksum"] == first.manifest["checksum"]


def test_determinism_by_seed(tmp_path):
    a, b, c = _dm(tmp_path, seed=3), _dm(tmp_path / "other", seed=3), _dm(tmp_path, seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert a.manifest["poisoned_indices"] == b.manifest["poisoned_indices"]
    assert a.manifest["poisoned_indices"] != c.manifest["poisoned_indices"]


def test_triggered_test_set_only_source_class_with_true_labels(tmp_path):
    dm = _dm(tmp_path)
    dm.setup()
    triggered = dm.triggered_test_dataset(1.0)
    assert (triggered.targets == 1).all() and len(triggered) == int((dm._test[1] == 1).sum())
    assert (triggered.images[:, :, 5:7, 5:7] == 1).all()
    with pytest.raises(ValueError, match="no target image"):
        dm.target_dataset()


def test_unknown_param_is_named(tmp_path):
    with pytest.raises(ValueError, match="epsilon"):
        PoisonedDataModule(DigitsDataModule(source="sklearn8x8"), attack="badnets", params={"epsilon": 1})
