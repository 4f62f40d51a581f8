import json

import pytest
import torch

from lit_robust.datamodules import DigitsDataModule, PoisonedDataModule
from lit_robust.datamodules.base import stack_dataset

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
