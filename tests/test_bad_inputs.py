"""Bad inputs fail at the start with a message naming the input and the fix (issue #33 items 1, 3, 4, 6): files that
would run code when unpickled, corrupt or stale artefacts, checkpoints of another model or image size, non-numbers.
Every file lives under ``tmp_path``; the data is scikit-learn's 8×8 digits."""
from __future__ import annotations

import json
import pathlib
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import REPO, run_script
from lit_robust import EBM, ImageClassifier
from lit_robust.cache import load_verified, save_atomic, sha256_bytes
from lit_robust.datamodules import DigitsDataModule, PoisonedDataModule
from lit_robust.datamodules.digits import load_digits_source
from lit_robust.ebm import load_ebm
from lit_robust.nets import load_weights
from lit_robust.poisons import CraftingData, craft_narcissus
from lit_robust.poisons.surrogate import load_or_train_surrogate
from lit_robust.runner import check_experiment, evaluate, fit_and_test, run_experiment
from lit_robust.serialization import CorruptFileError, NotPlainFileError
from lit_robust.smoothed_vit import SmoothedViT

DIGITS = ["data=digits_8x8", "trainer.max_epochs=1", "~callbacks.rich_progress_bar"]


class TouchesMarker:
    """Unpickling this creates ``marker``: the stand-in for code run by a crafted file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def code_payload(tmp_path: Path, name: str) -> Path:
    """A ``torch.save`` file (a state-dict-like dict) whose unpickling would create ``tmp_path/MARKER``."""
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hparams": {}, "net": {}, "x": TouchesMarker(tmp_path / "MARKER")},
               path)
    assert not (tmp_path / "MARKER").exists()
    return path


def assert_refused(error: pytest.ExceptionInfo, path: Path, tmp_path: Path) -> None:
    assert str(path) in str(error.value) and "not a plain-tensor file" in str(error.value)
    assert not (tmp_path / "MARKER").exists()


def compose_config(name: str, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """best.ckpt of a one-epoch digits classifier on the 8×8 digits."""
    run_dir = tmp_path_factory.mktemp("train")
    run_experiment("digits_classifier", DIGITS, run_dir)
    return run_dir / "checkpoints" / "best.ckpt"


def evaluate_checkpoint(path: Path, output_dir: Path, *overrides: str) -> None:
    overrides = ("experiment=digits_classifier", *DIGITS, *overrides)
    evaluate(compose_config("evaluate", *overrides, f"ckpt_path={path}", f"output_dir={output_dir}"), list(overrides))


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_source("sklearn8x8")
    return images[:400], labels[:400]


# ---- item 1: no code execution from files ---------------------------------------------------------------------------
def test_checkpoint_with_code_payload(tmp_path):
    path = code_payload(tmp_path, "evil.ckpt")
    with pytest.raises(NotPlainFileError) as error:
        evaluate_checkpoint(path, tmp_path / "out")
    assert_refused(error, path, tmp_path)


def test_resume_checkpoint_with_code_payload(tmp_path):
    path = code_payload(tmp_path, "evil.ckpt")
    cfg = compose_config("train", "experiment=digits_classifier", *DIGITS, f"ckpt_path={path}",
                         f"output_dir={tmp_path / 'out'}")
    with pytest.raises(NotPlainFileError) as error:
        fit_and_test(cfg)
    assert_refused(error, path, tmp_path)


def test_cache_entry_with_code_payload_and_matching_sha256(tmp_path):
    path = code_payload(tmp_path, "entry.pt")
    path.with_name("entry.pt.sha256").write_text(sha256_bytes(path.read_bytes()))
    with pytest.raises(NotPlainFileError) as error:
        load_verified(path)
    assert_refused(error, path, tmp_path)
    with pytest.raises(NotPlainFileError, match="not a plain-tensor file"):  # nor can one be written
        save_atomic(tmp_path / "other.pt", {"x": TouchesMarker(tmp_path / "MARKER")})
    assert not (tmp_path / "other.pt").exists()


def test_surrogate_file_with_code_payload(tmp_path, digits):
    path = code_payload(tmp_path, "surrogate.pt")
    with pytest.raises(NotPlainFileError) as error:
        load_or_train_surrogate(str(path), *digits, 10, epochs=1, progress=False)
    assert_refused(error, path, tmp_path)


def test_exported_ebm_weights_with_code_payload(tmp_path):
    path = code_payload(tmp_path, "ebm.pt")
    with pytest.raises(NotPlainFileError) as error:
        load_ebm(str(path))
    assert_refused(error, path, tmp_path)


def test_ebm_checkpoint_with_code_payload(tmp_path):
    path = code_payload(tmp_path, "ebm.ckpt")
    with pytest.raises(NotPlainFileError) as error:
        load_ebm(str(path))
    assert_refused(error, path, tmp_path)


def test_load_weights_file_with_code_payload(tmp_path):
    path = code_payload(tmp_path, "weights.pt")
    with pytest.raises(NotPlainFileError) as error:
        load_weights(ImageClassifier(), str(path))
    assert_refused(error, path, tmp_path)


def test_smoothed_vit_weights_path_with_code_payload(tmp_path):
    path = code_payload(tmp_path, "vit.pt")
    with pytest.raises(NotPlainFileError) as error:
        SmoothedViT(backbone="small_cnn", ablation_width=2, token_dropping=False, weights_path=str(path))
    assert_refused(error, path, tmp_path)


def test_experiment_name_with_parent_path(tmp_path):
    result = run_script("train.py", "experiment=../model/ebm", *DIGITS, f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode != 0
    assert "experiment=../model/ebm is not an experiment" in result.stderr and "digits_classifier" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"experiment=\.\./\.\./\.\./x is not an experiment; use one of: .*ebm_digits"):
        check_experiment("../../../x")


# ---- item 3: stale or corrupt artefacts ----------------------------------------------------------------------------
def test_surrogate_epochs_changed(tmp_path, digits):
    path = tmp_path / "surrogate.pt"
    load_or_train_surrogate(str(path), *digits, 10, epochs=1, progress=False)
    load_or_train_surrogate(str(path), *digits, 10, epochs=2, progress=False)
    assert len(list(tmp_path.glob("surrogate-*.pt"))) == 2 and not path.exists()


def test_narcissus_target_class_changed(tmp_path, digits):
    images, labels = digits
    data = CraftingData(images[:300], labels[:300], images[300:], labels[300:], 10)
    path = tmp_path / "narcissus_surrogate.pt"
    for target in (0, 1):
        craft_narcissus(data, target_class=target, surrogate_epochs=1, warmup_epochs=0, steps=1, batch_size=64,
                        surrogate_path=str(path), generator=torch.Generator().manual_seed(0), progress=False)
    assert len(list(tmp_path.glob("narcissus_surrogate-*.pt"))) == 2


def test_truncated_surrogate_without_sidecar(tmp_path, digits):
    path = tmp_path / "surrogate.pt"
    torch.save(ImageClassifier().state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptFileError, match=f"surrogate {re.escape(str(path))} is corrupt or truncated"):
        load_or_train_surrogate(str(path), *digits, 10, epochs=1, progress=False)


def test_truncated_surrogate_cache_entry(tmp_path, digits):
    path = tmp_path / "surrogate.pt"
    first = load_or_train_surrogate(str(path), *digits, 10, epochs=1, progress=False)
    (entry,) = tmp_path.glob("surrogate-*.pt")
    entry.write_bytes(entry.read_bytes()[:1000])
    entry.with_name(entry.name + ".sha256").unlink()
    again = load_or_train_surrogate(str(path), *digits, 10, epochs=1, progress=False)  # rebuilt
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert load_verified(entry) is not None


def test_corrupt_poison_manifest(tmp_path):
    def poisoned():
        module = PoisonedDataModule(DigitsDataModule(source="sklearn8x8"), attack="badnets",
                                    cache_dir=str(tmp_path), progress=False)
        module.setup()
        return module

    first = poisoned()
    (manifest,) = tmp_path.glob("badnets-*.json")
    manifest.write_text('{"attack": "badn')
    second = poisoned()
    assert json.loads(manifest.read_text()) == json.loads(json.dumps(second.manifest)) == json.loads(
        json.dumps(first.manifest))


# ---- item 4: checkpoints verified and identified --------------------------------------------------------------------
def test_truncated_checkpoint(tmp_path, checkpoint):
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(CorruptFileError, match=f"checkpoint {re.escape(str(path))} is corrupt or truncated"):
        evaluate_checkpoint(path, tmp_path / "out")


def test_checkpoint_of_another_model(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="holds a lit_robust.ImageClassifier but the config builds a lit_robust.EBM: "
                                         "pass the experiment= of the training run"):
        evaluate_checkpoint(checkpoint, tmp_path / "out", "experiment=ebm_digits")


def test_checkpoint_with_nan_weights(tmp_path, checkpoint, caplog):
    saved = torch.load(checkpoint, weights_only=True)
    saved["state_dict"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                           for k, v in saved["state_dict"].items()}
    torch.save(saved, tmp_path / "nan.ckpt")
    evaluate_checkpoint(tmp_path / "nan.ckpt", tmp_path / "out")
    assert "non-finite test metrics" in caplog.text and "test/loss" in caplog.text
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["test/non_finite"] >= 1


def test_28x28_data_for_8x8_checkpoint(tmp_path, checkpoint):
    with pytest.raises(ValueError, match=r"trained on 1×8×8 images but the data gives 1×28×28: .*data.img_size=8"):
        evaluate_checkpoint(checkpoint, tmp_path / "out", "data=digits")


def test_ebm_img_size_28_on_8x8_data(tmp_path):
    cfg = compose_config("train", "experiment=ebm_digits", *DIGITS, "trainer.max_steps=1", "model.img_size=28",
                         f"output_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"model.img_size=28 but the data \(1×8×8 images\) has img_size=8"):
        fit_and_test(cfg)


# ---- item 6: numbers that are not numbers --------------------------------------------------------------------------
def test_seed_abc(tmp_path):
    with pytest.raises(ValueError, match="seed='abc' is not an integer"):
        run_experiment("digits_classifier", [*DIGITS, "seed=abc"], tmp_path)


def test_model_lr_abc(tmp_path):
    with pytest.raises(ValueError, match="model.lr='abc' is not a number: set model.lr="):
        run_experiment("digits_classifier", [*DIGITS, "model.lr=abc"], tmp_path)
