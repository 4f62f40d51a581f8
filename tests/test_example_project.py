"""The defences in a Lightning project written the usual way (``examples/plain_lightning``), with lit_robust installed
from its wheel (not editable): they act on what the project's loader reads, give the same numbers whether the loader
normalises (declared with ``normalization=``) or not, give the single-process numbers on 2 DDP processes, and stop
with an error naming the fix where they cannot act correctly.

A stubbed defence fails here: an identity purification leaves ``loader_l2_change`` at 0, a filter that removes
nothing (or at random) has no recall of the planted poisons, and a callback that replaces the wrong attribute is
caught by the probe's loader length / change. So does a defence that freezes a random augmentation, leaves its split
in a reused DataModule, or ignores loaders given to ``fit``."""
from __future__ import annotations

import json
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from conftest import REPO, run_checked

EXAMPLE = REPO / "examples" / "plain_lightning"
sys.path.insert(0, str(EXAMPLE))

from project import MNIST_MEAN, MNIST_STD, LitClassifier, MNISTDataModule  # noqa: E402

from lit_robust import EBM  # noqa: E402
from lit_robust.callbacks import EBMPurification, SpectralSignatureFilter  # noqa: E402

ALL = ["purify", "spectral", "ispl", "certify", "patchcleanser", "adversarial", "missingness", "ood"]


def defend(installed, tmp_path, name: str, *flags: str, defences=ALL) -> dict:
    """``defend.py`` with the wheel's Python, from a folder outside the checkout."""
    out = tmp_path / f"{name}.json"
    run_checked([installed["bin"] / "python", EXAMPLE / "defend.py", *defences, "--out", out, "--workdir",
                 tmp_path / name, *flags], cwd=tmp_path, env={**installed["env"], "PYTHONPATH": str(EXAMPLE)},
                timeout=600)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def normalised(installed, tmp_path_factory) -> dict:
    """One process, Normalize declared, the split aliased as ``train_dataset`` (the loader still reads
    ``mnist_train``)."""
    return defend(installed, tmp_path_factory.mktemp("example"), "normalised", "--alias")


def test_defences_act_on_what_the_loader_reads(normalised):
    purify, spectral = normalised["purify"], normalised["spectral"]
    # the train loader iterates the purified images (not the originals): the same change the callback reports
    assert purify["probe"]["loader_l2_change"] == pytest.approx(purify["mean_l2_change"], rel=0.05)
    assert purify["probe"]["loader_l2_change"] > 0.3 and purify["probe"]["loader_len"] == 600
    assert 0 <= purify["probe"]["loader_min"] and purify["probe"]["loader_max"] <= 1  # [0, 1] after undoing Normalize
    # the loader iterates the filtered split, and the filter caught the planted trigger far above chance
    assert spectral["probe"]["loader_len"] == 600 - spectral["removed"]
    chance = spectral["removed"] / 600
    assert spectral["recall"] > chance + 0.3
    ispl = normalised["ispl"]
    assert ispl["probe"]["loader_len"] == 600 - ispl["removed"] and ispl["recall"] > ispl["removed"] / 600 + 0.3


def test_certification_and_ood_run_on_the_users_own_models(normalised):
    certify, ood = normalised["certify"], normalised["ood"]
    assert certify["cert/test/acc"] >= certify["cert/test/acc_m2"] >= certify["cert/test/acc_m4"]
    assert certify["cert/test/acc"] > 0.3  # the smoothed vote of a trained CNN, far above chance (0.1)
    assert ood["ood/bbb/noise/count"] == 200 and ood["ood/bbb/inliers/count"] == 200
    assert ood["ood/bbb/noise/expected_ll/auroc"] > 0.95  # uniform noise is unlikely under the digits' VAE


def test_patchcleanser_and_attacks_act_on_the_users_model_in_pixel_space(normalised):
    """PatchCleanser certifies some images but never more than it classifies right, fewer for a larger patch; the
    attacks (in [0, 1] pixel units, through the loader's Normalize) lower accuracy with ε and erase it at ε = 0.3.
    Caught: an attack that does nothing (robust = clean), one that ignores ε, and a certifier that certifies nothing
    or every image it classifies right."""
    cleanser, attacked = normalised["patchcleanser"], normalised["adversarial"]
    for m in (2, 4):
        assert 0 < cleanser[f"cert/test/acc_m{m}"] < cleanser[f"cert/test/clean_m{m}"]
    assert cleanser["cert/test/acc_m4"] <= cleanser["cert/test/acc_m2"]
    clean, small, large = (attacked[f"adv/test/{k}"] for k in ("clean", "eps0.05/robust", "eps0.3/robust"))
    assert clean > 0.7 and clean - 0.3 < small < clean and large < 0.05


def test_missingness_report_runs_on_the_users_cnn(normalised):
    """Blacking out a quarter, then half, of the 7×7 regions of the user's CNN: removing the most salient regions
    changes more predictions than removing the least salient ones, and more regions change more; removing the
    regions LIME ranks first changes more than removing random ones. Caught: orders that ignore the saliency (most =
    least), a blackout that removes nothing (everything unchanged), LIME scores of random or flipped sign."""
    report = normalised["missingness"]
    least, most = (report[f"missing/test/blackout/{o}_salient/unchanged_f50"] for o in ("least", "most"))
    assert most < least
    for percent in (25, 50):
        assert (report[f"missing/test/blackout/lime_own/unchanged_f{percent}"]
                < report[f"missing/test/blackout/lime_random/unchanged_f{percent}"] - 0.1)
    assert report["missing/test/blackout/random/unchanged_f50"] < report["missing/test/blackout/random/unchanged_f25"]
    assert report["missing/test/blackout/acc"] > 0.7


def test_unnormalised_dict_items_give_the_normalised_numbers(installed, normalised, tmp_path):
    raw = defend(installed, tmp_path, "raw", "--raw", "--dict-items", defences=["purify", "spectral", "ispl", "ood"])
    assert raw["purify"]["mean_l2_change"] == pytest.approx(normalised["purify"]["mean_l2_change"], abs=0.02)
    for name in ("spectral", "ispl"):
        assert raw[name]["recall"] == pytest.approx(normalised[name]["recall"], abs=0.02), name
    for key, value in normalised["ood"].items():
        if key.endswith("/auroc"):
            assert raw["ood"][key] == pytest.approx(value, abs=0.02), key


def test_two_ddp_processes_give_the_single_process_numbers(installed, normalised, tmp_path):
    ddp = defend(installed, tmp_path, "ddp", "--alias", "--devices", "2")
    assert ddp["purify"]["mean_l2_change"] == pytest.approx(normalised["purify"]["mean_l2_change"], rel=1e-5)
    assert ddp["purify"]["probe"] == normalised["purify"]["probe"]
    assert ddp["spectral"] == normalised["spectral"] and ddp["ispl"] == normalised["ispl"]
    for name in ("certify", "patchcleanser", "adversarial", "missingness"):
        for key, value in normalised[name].items():
            if key.startswith(("cert/", "adv/", "missing/")):  # the project's own test_acc is logged per rank, unsynced
                assert ddp[name][key] == pytest.approx(value, abs=1e-6), (name, key)
    for key, value in normalised["ood"].items():
        assert ddp["ood"][key] == pytest.approx(value, abs=1e-5), key


@pytest.fixture(scope="module")
def dropin(installed, tmp_path_factory) -> dict:
    """One process: a randomly augmented split purified twice, a reused DataModule, loaders given to fit and loaders
    defined on the module."""
    return defend(installed, tmp_path_factory.mktemp("dropin"), "dropin", defences=["augment", "reuse", "loaders"])


def test_an_augmented_split_is_purified_before_its_random_transforms(dropin):
    """RandomAffine → ToTensor → Normalize: the loader serves new draws on every read and every epoch (a purified
    fixed draw changes 0 of 8), the purified images are purify(ToTensor(digit)) exactly, and the second run finds all
    its chunks in the cache (a key over augmented draws never hits)."""
    augment = dropin["augment"]
    assert augment["changed_between_reads"] == 8 and augment["changed_between_epochs"] == 8
    assert augment["max_diff_to_purified_digits"] < 1e-5 and augment["mean_l2_change"] > 0.3
    assert augment["chunks_computed"] == [2, 0] and augment["restored"]


def test_a_reused_datamodule_gives_its_original_data_to_the_next_run(dropin):
    """One DataModule fitted with a filter, a filter, nothing, a purification, nothing: the second filter reads the
    600 original images (not the first filter's subset) and the undefended runs train on the originals."""
    reuse = dropin["reuse"]
    kept = reuse["sizes"][0]
    assert 300 < kept < 600 and reuse["sizes"] == [kept, kept, 600, 600, 600] and reuse["last_fit_sees_original"]


def test_loaders_given_to_fit_or_defined_on_the_module_are_defended(installed, dropin, tmp_path):
    """trainer.fit(model, train_loader, val_loader) and a module with its own loaders: the loop iterates the purified
    images (the change the callback reports) and the filtered subset, as with a DataModule, and 2 DDP processes give
    the single-process numbers."""
    loaders = dropin["loaders"]
    for style in ("fit", "module"):
        purify, spectral = loaders[f"{style}/purify"], loaders[f"{style}/spectral"]
        assert purify["probe"]["loader_l2_change"] == pytest.approx(purify["decided"], rel=0.05)
        assert purify["probe"]["loader_l2_change"] > 0.3 and purify["probe"]["loader_len"] == 200
        assert 0 < len(spectral["decided"]) and spectral["probe"]["loader_len"] == 200 - len(spectral["decided"])
    assert loaders["fit/spectral"] == loaders["module/spectral"] and loaders["fit/purify"] == loaders["module/purify"]
    ddp = defend(installed, tmp_path, "ddp_loaders", "--devices", "2", defences=["loaders"])
    assert ddp["loaders"] == loaders


# ---- the cases that used to go wrong silently now stop before any work, naming the fix ----------------------------
def fit(callback, datamodule, tmp_path, **kwargs):
    trainer = L.Trainer(accelerator="cpu", max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(LitClassifier(), datamodule=datamodule, **kwargs)
    return trainer


def purification(**kwargs) -> EBMPurification:
    return EBMPurification(EBM.pretrained("digits"), steps=2, chunk_size=200, plots=False, progress=False, **kwargs)


def test_normalised_images_without_a_declaration_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"normalization=\(mean, std\)"):
        fit(purification(cache_dir=str(tmp_path)), MNISTDataModule(train_size=200), tmp_path)
    assert not list(tmp_path.rglob("chunk_*.pt"))


def test_a_wrong_declaration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not match the loader's Normalize"):
        fit(purification(normalization=((0.0,), (1.0,))), MNISTDataModule(train_size=200), tmp_path)


def test_naming_an_attribute_the_loader_does_not_read_names_the_one_it_reads(tmp_path):
    class Renamed(MNISTDataModule):
        def setup(self, stage):
            super().setup(stage)
            if stage == "fit":
                self.train_dataset = Subset(self.mnist_train, range(100))  # a copy the loader never reads

    with pytest.raises(RuntimeError, match="reads mnist_train: pass split='mnist_train'"):
        fit(purification(split="train_dataset", normalization=(MNIST_MEAN, MNIST_STD), cache_dir=str(tmp_path)),
            Renamed(train_size=200), tmp_path)
    assert not list(tmp_path.rglob("chunk_*.pt"))  # refused before purifying


def test_loaders_no_attribute_holds_are_rebuilt_around_the_replacement(tmp_path):
    """A hook that wraps its split anew on every call, and LightningDataModule.from_datasets (the split lives in a
    closure): the loop iterates the defended split; the hook gives the user's data again after fit."""
    class Fresh(MNISTDataModule):
        def train_dataloader(self):
            return DataLoader(Subset(self.mnist_train, range(len(self.mnist_train))), batch_size=64)

    data = Fresh(train_size=200)
    kept = SpectralSignatureFilter(feature_epochs=1, normalization=(MNIST_MEAN, MNIST_STD))
    trainer = fit(kept, data, tmp_path)
    assert trainer.train_dataloader.dataset is kept.installed and len(kept.installed) == int(kept.keep.sum()) < 200
    assert len(data.train_dataloader().dataset) == 200
    data = MNISTDataModule(train_size=200)
    data.setup("fit")
    purified = purification(normalization=(MNIST_MEAN, MNIST_STD))
    trainer = fit(purified, L.LightningDataModule.from_datasets(data.mnist_train, batch_size=64), tmp_path)
    assert trainer.train_dataloader.dataset is purified.installed and purified.stats["purify/mean_l2_change"] > 0.05


def test_a_loader_that_cannot_be_rebuilt_is_refused_before_any_work(tmp_path):
    from torch.utils.data import WeightedRandomSampler

    data = MNISTDataModule(train_size=200)
    data.setup("fit")
    weighted = DataLoader(data.mnist_train, batch_size=64, sampler=WeightedRandomSampler(torch.ones(200), 200))
    with pytest.raises(RuntimeError, match="cannot be rebuilt .* keep the split in an attribute"):
        fit(purification(normalization=(MNIST_MEAN, MNIST_STD), cache_dir=str(tmp_path)), None, tmp_path,
            train_dataloaders=weighted)
    assert not list(tmp_path.rglob("chunk_*.pt"))


def test_a_random_transform_that_cannot_be_separated_is_refused_before_purification(tmp_path):
    """A transform that adds noise after ToTensor inside one callable: the random part cannot run on its own, so
    purifying would freeze one draw; refused before any chunk, naming the Compose to write."""
    class NoisyToTensor:
        def __call__(self, image):
            return transforms.ToTensor()(image).add(0.05 * torch.rand(1)).clamp(0, 1)

    data = MNISTDataModule(train_size=200, normalize=False)
    data.train_transform = NoisyToTensor()
    with pytest.raises(ValueError, match=r"cannot be cut .* transforms\.Compose"):
        fit(purification(cache_dir=str(tmp_path)), data, tmp_path)
    assert not list(tmp_path.rglob("chunk_*.pt"))


def test_an_exception_during_fit_gives_the_datamodule_its_split_back(tmp_path):
    class Failing(LitClassifier):
        def training_step(self, batch, batch_idx):
            raise ArithmeticError("the user's own bug")

    data = MNISTDataModule(train_size=200)
    callback = SpectralSignatureFilter(feature_epochs=1, normalization=(MNIST_MEAN, MNIST_STD))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(ArithmeticError):
        trainer.fit(Failing(), datamodule=data)
    assert len(callback.installed) < 200 and len(data.mnist_train) == 200


def test_dict_items_with_other_keys_name_item_keys(tmp_path):
    class Keys(MNISTDataModule):
        def setup(self, stage):
            super().setup(stage)
            if stage == "fit":
                self.mnist_train = [{"pixels": image, "digit": label} for image, label in self.mnist_train]

        def train_dataloader(self):
            return DataLoader(self.mnist_train, batch_size=64)

    with pytest.raises(KeyError, match="item_keys"):
        fit(purification(normalization=(MNIST_MEAN, MNIST_STD)), Keys(train_size=100), tmp_path)
    callback = purification(normalization=(MNIST_MEAN, MNIST_STD), item_keys=("pixels", "digit"))
    with pytest.raises(Exception) as error:  # the model cannot read dicts, but the purification ran and installed
        fit(callback, Keys(train_size=100), tmp_path)
    assert callback.installed is not None and callback.stats["purify/mean_l2_change"] > 0
    assert set(callback.installed[0]) == {"pixels", "digit"} and "item_keys" not in str(error.value)


@pytest.mark.parametrize("shape, fix", [((3, 28, 28), "in_chans=1"), ((1, 16, 16), "img_size=28")])
def test_images_the_ebm_was_not_built_for_are_refused(tmp_path, shape, fix):
    class Other(MNISTDataModule):
        def setup(self, stage):
            if stage == "fit":
                images = torch.rand(64, *shape)
                self.mnist_train = list(zip(images, torch.zeros(64, dtype=torch.long)))

    with pytest.raises(ValueError, match=fix):
        fit(purification(), Other(), tmp_path)


def test_a_filter_then_a_purification_both_reach_the_loader(tmp_path):
    """Two train-split defences in one fit: the loader iterates the purified images of the kept subset."""
    contract = {"normalization": (MNIST_MEAN, MNIST_STD)}
    kept = SpectralSignatureFilter(removal_fraction=0.1, feature_epochs=1, **contract)
    purified = purification(cache_dir=str(tmp_path), **contract)
    data = MNISTDataModule(train_size=200)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, callbacks=[kept, purified], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(LitClassifier(), datamodule=data)
    loader_set = trainer.train_dataloader.dataset
    assert loader_set is purified.installed and loader_set.base is kept.installed
    assert len(loader_set) == int(kept.keep.sum()) < 200
    assert len(data.mnist_train) == 200 and data.mnist_train is kept.installed.dataset  # both undone, in any order


def test_a_loader_that_iterates_something_else_at_train_start_is_caught():
    """The last guard (on_train_start): the trainer's own loader must iterate what the defence installed."""
    from types import SimpleNamespace

    from lit_robust.callbacks.contract import check_train_loader_reads

    installed, other = list(range(4)), list(range(5))
    datamodule = SimpleNamespace(mnist_train=other)
    trainer = SimpleNamespace(train_dataloader=DataLoader(other), datamodule=datamodule)
    with pytest.raises(RuntimeError, match=r"SimpleNamespace\.mnist_train"):
        check_train_loader_reads(trainer, installed, "EBMPurification")
    check_train_loader_reads(SimpleNamespace(train_dataloader=DataLoader(Subset(installed, [0])), datamodule=None),
                             installed, "EBMPurification")  # a later defence's Subset of it is fine
