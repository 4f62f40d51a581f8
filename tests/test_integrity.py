"""Damaged files are refused or rebuilt, naming the file: checkpoints with NaN/inf weights or without the train.py
record, shipped weights whose bytes changed, cache entries that are not what their caller declares (a matching
checksum only proves the file is as written), temporary files of failed writes; dataset files that are truncated or
hold labels outside the classes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO
from dataset_trees import truncate, write_cifar10, write_mnist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lit_robust.callbacks.purification import EBMPurification
from lit_robust.datamodules import TorchvisionDataModule
from lit_robust.models import ebm as ebm_module
from lit_robust.models.ebm import EBM, load_ebm
from lit_robust.run.runner import evaluate, run_experiment
from lit_robust.storage.cache import load_verified, save_atomic
from lit_robust.storage.serialization import CorruptFileError, NonFiniteWeightsError

TRAINED_ON = "data=digits_8x8"
DIGITS = ["trainer.max_epochs=1", "~callbacks.rich_progress_bar"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """best.ckpt of a one-epoch digits classifier on the 8×8 digits."""
    run_dir = tmp_path_factory.mktemp("train")
    run_experiment("digits_classifier", [TRAINED_ON, *DIGITS], run_dir)
    return run_dir / "checkpoints" / "best.ckpt"


def evaluate_checkpoint(path: Path, output_dir: Path, data: list[str] = (TRAINED_ON,)) -> None:
    overrides = ["experiment=digits_classifier", *data, *DIGITS]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*overrides, f"ckpt_path={path}", f"output_dir={output_dir}"])
    evaluate(cfg, overrides)


def edited_copy(checkpoint: Path, path: Path, edit) -> Path:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def test_checkpoint_with_a_nan_weight_is_refused_naming_file_and_tensor(checkpoint, tmp_path):
    first = next(iter(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]))

    def flip(state):
        state["state_dict"][first].view(-1)[3] = float("nan")

    path = edited_copy(checkpoint, tmp_path / "flipped.ckpt", flip)
    with pytest.raises(NonFiniteWeightsError, match=rf"{path}.*{first} holds 1 NaN/inf"):
        evaluate_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.json").exists()
    evaluate_checkpoint(checkpoint, tmp_path / "good")  # the undamaged one evaluates
    assert (tmp_path / "good" / "metrics.json").exists()


def test_checkpoint_without_the_lit_robust_record_is_refused_with_the_reason(checkpoint, tmp_path):
    path = edited_copy(checkpoint, tmp_path / "plain.ckpt", lambda state: state.pop("lit_robust"))
    with pytest.raises(ValueError, match=rf"{path} has no lit_robust record .* not written by train.py"):
        evaluate_checkpoint(path, tmp_path / "out")


def test_checkpoint_evaluated_on_other_data_of_the_same_shape_is_refused(checkpoint, tmp_path):
    """Trained on scikit-learn's 8×8 digits; MNIST's digits shrunk to 8×8 pass the image-shape check."""
    with pytest.raises(ValueError, match=r"trained on data with source_dataset=DigitsDataModule:sklearn8x8 but the "
                                         r"data \(DigitsDataModule\) has source_dataset=DigitsDataModule:mnist5k"):
        evaluate_checkpoint(checkpoint, tmp_path / "out", ["data=digits", "data.img_size=8"])
    record = torch.load(checkpoint, map_location="cpu", weights_only=True)["lit_robust"]
    assert record["num_classes"] == 10 and record["input_shape"] == [1, 8, 8]

    def hundred_classes(state):
        state["lit_robust"]["num_classes"] = 100

    path = edited_copy(checkpoint, tmp_path / "cifar100.ckpt", hundred_classes)
    with pytest.raises(ValueError, match=r"trained on data with num_classes=100 but the data .* has num_classes=10"):
        evaluate_checkpoint(path, tmp_path / "out_cifar100")


def test_ebm_checkpoint_and_export_with_inf_weights_are_refused(tmp_path):
    ebm = EBM(img_size=8, channels=(4, 8), down=(True, False), bank_size=4)
    with torch.no_grad():
        next(ebm.net.parameters()).view(-1)[0] = float("inf")
    ebm.export(tmp_path / "ebm.pt")
    with pytest.raises(NonFiniteWeightsError, match=rf"{tmp_path / 'ebm.pt'}.*holds 1 NaN/inf"):
        load_ebm(str(tmp_path / "ebm.pt"))


# ---- shipped weights ----------------------------------------------------------------------------------------------------
SHIPPED = Path(ebm_module.__file__).parents[1] / "weights"  # lit_robust/weights, beside lit_robust/models/


def shipped_copy(tmp_path: Path, monkeypatch, flip_byte: int | None) -> Path:
    """The package's weights/ folder copied under ``tmp_path`` (one byte flipped), which ``EBM.pretrained`` reads."""
    source = SHIPPED
    (tmp_path / "weights").mkdir(parents=True)
    payload = bytearray((source / "ebm_digits.pt").read_bytes())
    if flip_byte is not None:
        payload[flip_byte] ^= 0x01
    (tmp_path / "weights" / "ebm_digits.pt").write_bytes(bytes(payload))
    (tmp_path / "weights" / "SHA256SUMS").write_text((source / "SHA256SUMS").read_text())
    monkeypatch.setattr(ebm_module.resources, "files", lambda package: tmp_path)
    return tmp_path / "weights" / "ebm_digits.pt"


def test_shipped_ebm_weights_carry_their_checksum():
    assert ebm_module.shipped_sha256("ebm_digits.pt") == hashlib.sha256(
        (SHIPPED / "ebm_digits.pt").read_bytes()).hexdigest()
    assert EBM.pretrained().net is not None


def test_shipped_ebm_weights_with_a_flipped_byte_are_refused(tmp_path, monkeypatch):
    shipped_copy(tmp_path / "as_shipped", monkeypatch, flip_byte=None)
    EBM.pretrained()  # the copy as shipped loads
    size = (SHIPPED / "ebm_digits.pt").stat().st_size
    path = shipped_copy(tmp_path / "flipped", monkeypatch, flip_byte=size // 2)  # inside the tensor data
    with pytest.raises(CorruptFileError, match=rf"{path} is damaged.*reinstall lit-robust.*experiment=ebm_digits"):
        EBM.pretrained()


# ---- caches ------------------------------------------------------------------------------------------------------------
def forge(path: Path, entry) -> None:
    """Replace a cache entry with ``entry`` and a matching checksum (whoever can write one can write both)."""
    save_atomic(path, entry)


def test_cache_entries_that_are_not_as_declared_are_rebuilt_with_a_warning(tmp_path):
    path = tmp_path / "chunk_00000.pt"
    declared = {"shape": (4, 1, 8, 8), "dtype": torch.float32, "value_range": (0.0, 1.0)}
    good = torch.rand(4, 1, 8, 8)
    forge(path, good)
    assert torch.equal(load_verified(path, **declared), good)
    for entry, problem in [(torch.full((4, 1, 8, 8), float("nan")), "NaN/inf"),
                           ({"images": good}, "holds a dict, not a Tensor"),
                           (good[:3], r"shape \(3, 1, 8, 8\)"),
                           (good.double(), "torch.float64"),
                           (good * 2 + 0.5, r"outside \[0, 1\]")]:
        forge(path, entry)
        with pytest.warns(UserWarning, match=rf"cache entry {path} .*{problem}.*rebuilding it"):
            assert load_verified(path, **declared) is None
    forge(path, {"weight": torch.tensor([1.0, float("inf")])})  # undeclared entries: finite tensors still required
    with pytest.warns(UserWarning, match=r"NaN/inf in weight"):
        assert load_verified(path) is None
    forge(path, torch.ones(2))
    with pytest.warns(UserWarning, match="holds a Tensor, not a dict"):
        assert load_verified(path, kind=dict) is None


def test_failed_cache_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_atomic(tmp_path / "chunk_00000.pt", torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_purification_rebuilds_a_forged_nan_chunk(tmp_path):
    import lightning as L

    from lit_robust import ImageClassifier
    from lit_robust.datamodules import DigitsDataModule

    def purified(cache_dir):
        torch.manual_seed(0)
        ebm = EBM(img_size=8, channels=(4, 8), down=(True, False), bank_size=4)
        callback = EBMPurification(ebm, steps=2, chunk_size=700, cache_dir=str(cache_dir), progress=False)
        datamodule = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)
        L.Trainer(max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False, limit_val_batches=0,
                  enable_model_summary=False, enable_progress_bar=False, default_root_dir=str(tmp_path)
                  ).fit(ImageClassifier(), datamodule=datamodule)
        return datamodule.train_dataset.images

    reference = purified(tmp_path / "cache")
    chunk = next((tmp_path / "cache").rglob("chunk_00001.pt"))
    forge(chunk, torch.full_like(load_verified(chunk), float("nan")))
    with pytest.warns(UserWarning, match=rf"cache entry {chunk} holds NaN/inf; rebuilding it"):
        again = purified(tmp_path / "cache")
    assert torch.equal(again, reference) and torch.isfinite(load_verified(chunk)).all()


# ---- dataset files -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damaged", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_truncated_mnist_file_is_named_with_the_fix(tmp_path, damaged):
    write_mnist(tmp_path)
    truncate(tmp_path / "MNIST" / "raw" / damaged, drop=3)
    with pytest.raises(CorruptFileError, match=rf"{tmp_path / 'MNIST' / 'raw' / damaged} is corrupt or truncated"
                                               r".*delete it and pass data.download=true"):
        TorchvisionDataModule(name="mnist", data_dir=str(tmp_path)).setup("fit")


def test_cifar_batch_that_is_not_the_real_one_is_named(tmp_path):
    write_cifar10(tmp_path)  # real format, but not the real files' bytes (md5)
    with pytest.raises(CorruptFileError, match=rf"{tmp_path / 'cifar-10-batches-py' / 'data_batch_1'} is corrupt"):
        TorchvisionDataModule(name="cifar10", data_dir=str(tmp_path)).setup("fit")


def test_labels_outside_the_classes_are_refused_at_setup(tmp_path):
    write_mnist(tmp_path, max_label=12)
    with pytest.raises(ValueError, match=r"mnist train split in .* has label 12 at index 5 \(1 of 6 labels outside "
                                         r"0..9.*data.download=true"):
        TorchvisionDataModule(name="mnist", data_dir=str(tmp_path)).setup("fit")
    intact = tmp_path / "intact"
    write_mnist(intact)
    TorchvisionDataModule(name="mnist", data_dir=str(intact), val_size=1).setup("fit")
