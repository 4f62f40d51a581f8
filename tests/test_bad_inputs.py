"""Bad inputs fail at the start with a message naming the input and the fix (issue #33 items 1–6): files that
would run code when unpickled, corrupt or stale artefacts, checkpoints of another model or image size, non-numbers,
purification or crafting that destroys the images, a run dir reused by a second run, small classes, unusable folders,
empty splits. Every file lives under ``tmp_path``; the data is scikit-learn's 8×8 digits."""
from __future__ import annotations

import functools
import json
import pathlib
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, run_script
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lit_robust import EBM, ImageClassifier
from lit_robust.callbacks import EBMPurification, MetricsFile, SpectralSignatureFilter
from lit_robust.callbacks.purification import Purification, check_purified
from lit_robust.callbacks.robustness_report import fit_baselines
from lit_robust.datamodules import DigitsDataModule, PoisonedDataModule, TensorImageDataset, TorchvisionDataModule
from lit_robust.datamodules import poisoned as poisoned_module
from lit_robust.datasets import load_digits_source
from lit_robust.functional.backdoor_filters import activation_clustering_keep, trimmed_loss_keep
from lit_robust.functional.ispl import ISPLSchedule, self_training
from lit_robust.models.ebm import load_ebm
from lit_robust.models.nets import load_weights
from lit_robust.models.smoothed_vit import SmoothedViT
from lit_robust.poisons import CraftingData, craft_narcissus
from lit_robust.poisons.surrogate import load_or_train_surrogate
from lit_robust.run.runner import check_experiment, evaluate, fit_and_test, run_experiment
from lit_robust.storage.cache import load_verified, save_atomic, sha256_bytes
from lit_robust.storage.json_files import update_metrics_file
from lit_robust.storage.serialization import CorruptFileError, NotPlainFileError

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
    assert "experiment=../model/ebm is a path, not an experiment name" in result.stderr
    assert "digits_classifier" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"experiment=\.\./\.\./\.\./x is a path, not an experiment name; use one "
                                         r"of: .*ebm_digits"):
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


def test_checkpoint_whose_finite_weights_overflow(tmp_path, checkpoint, caplog):
    """Weights of 3e38 are finite (NaN/inf weights are refused at load, tests/test_integrity.py) but overflow the
    activations: the test metrics are NaN."""
    saved = torch.load(checkpoint, weights_only=True)
    saved["state_dict"] = {k: v.float().fill_(3e38) if v.is_floating_point() else v
                           for k, v in saved["state_dict"].items()}
    torch.save(saved, tmp_path / "overflow.ckpt")
    evaluate_checkpoint(tmp_path / "overflow.ckpt", tmp_path / "out")
    assert "non-finite test metrics" in caplog.text and "test/loss" in caplog.text
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["test/non_finite"] >= 1


def test_28x28_data_for_8x8_checkpoint(tmp_path, checkpoint):
    # the training images upsampled (MNIST's own 28×28 digits are another dataset: tests/test_integrity.py)
    with pytest.raises(ValueError, match=r"trained on 1×8×8 images but the data gives 1×28×28: .*data.img_size=8"):
        evaluate_checkpoint(checkpoint, tmp_path / "out", "data.img_size=28")


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


# ---- item 2: purification and crafting that destroy the images -----------------------------------------------------
class ChangedDigits(DigitsDataModule):
    """The 8×8 digits with the train split cut to the rows ``keep(labels)`` (default: all) and its images replaced by
    ``change(images)``."""

    def __init__(self, change=lambda images: images, keep=None, **kwargs):
        super().__init__(source="sklearn8x8", batch_size=64, seed=0, **kwargs)
        self.change, self.keep = change, keep

    def setup(self, stage=None):
        if self.train_dataset is None:
            super().setup(stage)
            images, labels = self.train_dataset.images, self.train_dataset.targets
            rows = self.keep(labels) if self.keep is not None else torch.arange(len(labels))
            self.train_dataset = TensorImageDataset(self.change(images[rows]), labels[rows])


def fit_one_step(datamodule, *callbacks, root: Path, model=None):
    trainer = L.Trainer(max_steps=1, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_model_summary=False, enable_progress_bar=False,
                        default_root_dir=str(root))
    trainer.fit(model or ImageClassifier(), datamodule=datamodule)
    return trainer


def tiny_purification(cache: Path, **kwargs) -> EBMPurification:
    torch.manual_seed(0)
    ebm = EBM(img_size=8, channels=(4, 8), down=(True, False), bank_size=4)
    return EBMPurification(ebm, **{"steps": 2, "chunk_size": 400, "cache_dir": str(cache), "progress": False,
                                   "plots": False, **kwargs})


def assert_nothing_cached(cache: Path) -> None:
    assert not list(cache.rglob("chunk_*.pt"))


@pytest.mark.parametrize("change", [lambda x: x * 255, lambda x: x - 0.5], ids=["times_255", "below_0"])
def test_purification_of_images_outside_0_1(tmp_path, change):
    with pytest.raises(ValueError, match=r"works on images in \[0, 1\] but the split's pixels span .*normalization="):
        fit_one_step(ChangedDigits(change), tiny_purification(tmp_path / "cache"), root=tmp_path)
    assert_nothing_cached(tmp_path / "cache")


@pytest.mark.parametrize("setting", [{"step_size": 1e3}, {"temperature": 1e-30}], ids=["step_size_1e3",
                                                                                         "temperature_1e-30"])
def test_purification_step_size_1e3_or_temperature_1e_30(tmp_path, setting):
    callback = tiny_purification(tmp_path / "cache", **setting)  # the default saturation bound
    with pytest.raises((ValueError, FloatingPointError), match="step_size.*temperature|temperature.*step_size"):
        fit_one_step(ChangedDigits(), callback, root=tmp_path)
    assert_nothing_cached(tmp_path / "cache")


def test_purification_step_size_nan(tmp_path):
    callback = tiny_purification(tmp_path / "cache", step_size=float("nan"))
    calls = []
    callback.ebm.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="step_size=nan"):
        fit_one_step(ChangedDigits(), callback, root=tmp_path)
    assert not calls  # refused before the first energy evaluation
    assert_nothing_cached(tmp_path / "cache")


def test_normal_purification_of_28x28_digits_is_not_refused():
    """The shipped EBM, 150 steps, on the shipped 28×28 digits: about 68 % of the pixels strictly inside (0, 1) end
    at 0 or 1 (the faint stroke edges are denoised to the background) — below the default bound 0.9; a destroying
    step (step_size ×4 and up) saturates over 99 %."""
    import inspect

    images = DigitsDataModule(seed=0)
    images.setup("fit")
    before = images.train_dataset.images[:16]
    after = EBM.pretrained("digits").purify(before, 150, generator=torch.Generator().manual_seed(0))[0]
    default = inspect.signature(Purification).parameters["max_saturated"].default
    check_purified(before, after, default, "EBMPurification")


def test_narcissus_lr_nan(tmp_path):
    with pytest.raises(ValueError, match=r"data.params.lr=nan is not a finite number"):
        PoisonedDataModule(DigitsDataModule(source="sklearn8x8"), attack="narcissus", params={"lr": float("nan")},
                           cache_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_crafting_that_yields_nan_pixels(tmp_path, monkeypatch):
    craft = poisoned_module.ATTACKS["badnets"]

    @functools.wraps(craft)
    def diverging(*args, **kwargs):
        poisons = craft(*args, **kwargs)
        poisons.images = poisons.images * float("nan")
        return poisons

    monkeypatch.setitem(poisoned_module.ATTACKS, "badnets", diverging)
    module = PoisonedDataModule(DigitsDataModule(source="sklearn8x8"), attack="badnets", cache_dir=str(tmp_path),
                                progress=False)
    with pytest.raises(FloatingPointError, match="attack 'badnets' crafted NaN or infinite images .*data.params"):
        module.setup()
    assert not list(tmp_path.glob("badnets-*"))


# ---- item 5: one run per run dir -----------------------------------------------------------------------------------
class ReportsAtTestEnd(L.Callback):
    """A report callback that merges its own key into metrics.json during the run (as RobustnessReport does)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_test_end(self, trainer, pl_module):
        update_metrics_file(self.folder / "metrics.json", {"report/x": 1.0})


def test_second_run_in_the_same_run_dir(tmp_path):
    datamodule = DigitsDataModule(source="sklearn8x8", batch_size=64, seed=0)

    def trainer(*callbacks):
        return L.Trainer(max_steps=2, limit_val_batches=1, limit_test_batches=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         callbacks=list(callbacks), default_root_dir=str(tmp_path))

    model = ImageClassifier()
    first = trainer(MetricsFile(str(tmp_path)))
    first.fit(model, datamodule=datamodule)
    first.test(model, datamodule=datamodule)  # fit-end then test-end: both land
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert {"train/loss", "test/acc"} <= set(written)
    second = trainer(ReportsAtTestEnd(tmp_path), MetricsFile(str(tmp_path)))  # the report writes before MetricsFile
    second.validate(model, datamodule=datamodule)
    second.test(model, datamodule=datamodule)  # validate then test (evaluate.py): both land
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/acc", "test/acc", "report/x"} <= set(again) and "train/loss" not in again


# ---- item 6: small classes, unusable folders, empty splits ---------------------------------------------------------
def test_spectral_signature_filter_on_a_class_of_2(tmp_path):
    datamodule = ChangedDigits(keep=lambda labels: torch.cat([(labels != 9).nonzero().flatten(),
                                                              (labels == 9).nonzero().flatten()[:2]]))
    callback = SpectralSignatureFilter(removal_fraction=0.6, feature_epochs=1, hidden=16)  # ⌈0.6 · 2⌉ = 2
    kept = fit_one_step(datamodule, callback, root=tmp_path).train_dataloader.dataset
    assert int((kept.dataset.targets[kept.indices] == 9).sum()) == 1


def contradicted_small_class(n: int = 120, small: int = 3):
    """Two separable blobs (classes 0, 1) and a third class of ``small`` points inside blob 0: a learner gets the
    small class wrong, so a loss- or vote-based cut removes all of it."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(n, 4, generator=generator) * 0.1
    labels = torch.arange(n) % 2
    inputs[labels == 1] += 3.0
    labels[torch.nonzero(labels == 0).flatten()[:small]] = 2
    return inputs, labels


def test_itlm_keep_fraction_on_a_class_of_3():
    inputs, labels = contradicted_small_class()
    keep = trimmed_loss_keep(inputs, labels, 3, keep_fraction=0.97, rounds=2, first_epochs=20, epochs=5, hidden=16,
                             generator=torch.Generator().manual_seed(0))
    assert int(keep[labels == 2].sum()) >= 1 and int((~keep).sum()) >= 1


def test_weak_learner_vote_against_a_class_of_3():
    inputs, labels = contradicted_small_class()
    voted = labels != 2  # the vote removed the whole class
    for epochs in (0, 4):
        schedule = ISPLSchedule(self_train_epochs=epochs, resample_every=2, hidden=16)
        keep = self_training(inputs, labels, voted, schedule, 3, torch.Generator().manual_seed(0))
        assert int(keep[labels == 2].sum()) >= 1


def test_activation_clustering_size_threshold_above_half():
    with pytest.raises(ValueError, match=r"size_threshold=0.6: .*\(0, 0.5\]"):
        activation_clustering_keep(torch.randn(8, 4), torch.zeros(8, dtype=torch.long), size_threshold=0.6)


@pytest.mark.parametrize("download", [False, True])
def test_data_dir_is_a_file(tmp_path, download):
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=f"data.data_dir={re.escape(str(path))} is a file") as error:
        TorchvisionDataModule(name="mnist", data_dir=str(path), download=download).prepare_data() if download \
            else TorchvisionDataModule(name="mnist", data_dir=str(path)).setup()
    assert "download=true" not in str(error.value)


def test_data_dir_not_writable_with_download(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    folder = tmp_path / "file" / "data"  # cannot be created: the stand-in for a read-only folder (tests run as root)
    with pytest.raises(PermissionError, match=f"data.data_dir={re.escape(str(folder))} cannot be written"):
        TorchvisionDataModule(name="mnist", data_dir=str(folder), download=True).prepare_data()


def test_poison_cache_dir_not_writable(tmp_path, monkeypatch):
    (tmp_path / "file").write_bytes(b"x")
    folder = tmp_path / "file" / "poisons"
    monkeypatch.setattr(PoisonedDataModule, "craft", lambda *args: pytest.fail("crafting started"))
    module = PoisonedDataModule(DigitsDataModule(source="sklearn8x8"), attack="narcissus", cache_dir=str(folder),
                                progress=False)
    with pytest.raises(PermissionError, match=f"data.cache_dir={re.escape(str(folder))} cannot be written"):
        module.setup()


def test_report_cache_dir_not_writable(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    datamodule = DigitsDataModule(source="sklearn8x8")
    datamodule.setup("fit")
    with pytest.raises(PermissionError, match="the report's cache_dir=.* cannot be written"):  # before training
        fit_baselines(datamodule, datamodule.train_dataset.images, {"plain": {}}, 1, 0,
                      cache_dir=str(tmp_path / "file" / "baselines"))


def test_empty_train_split(tmp_path):
    datamodule = ChangedDigits(keep=lambda labels: torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="ChangedDigits's train split is empty"):
        fit_one_step(datamodule, root=tmp_path)
