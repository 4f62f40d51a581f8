"""Every experiment in ``conf/experiment/`` runs end to end — fit, test, callbacks, reports — through ``train.py``'s
path (``runner.run_experiment``) under ``smoke=true`` (``conf/smoke.yaml``: a few batches, steps, images), and its
``metrics.json`` holds the experiment's documented ``headline_metrics``, all finite.

Experiments reading torchvision datasets get tiny trees in the real on-disk formats (``tests/dataset_trees.py``);
only the CIFAR-10 / SVHN md5 checks of the real archives' files are patched. Weights an experiment requires
(``model.weights_path``, a DDPM checkpoint) are written by the test in the format the config asks for. On this
CPU-only machine ``smoke=true`` also swaps ``trainer=gpu`` and bf16 for one CPU process in full precision
(``runner.shrink_for_smoke``), so the GPU-pinned configs (``smoothed_vit_cifar10``, ``smoothed_vit_imagenet``) run too.
"""
from __future__ import annotations

import math
from pathlib import Path

import hydra
import lightning as L
import pytest
import timm
import torch
from conftest import REPO
from dataset_trees import (patch_fixed_md5_checks, write_cifar10, write_cinic10, write_image_folder, write_imagenet,
                           write_mnist, write_svhn)
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lit_robust.models.classifier import ImageClassifier
from lit_robust.models.ddpm import load_ddpm
from lit_robust.models.ebm import load_ebm
from lit_robust.run import runner

# crafting one Narcissus surrogate per class takes minutes even under smoke=true: run with -m slow
SLOW = {"ebm_narcissus_all_digits"}
EXPERIMENTS = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
               for name in sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))]
# ebm_digits made the shipped EBM, ebm_narcissus_(all_)digits feed PureEBM-P, the others the purifiers trained on
# other data (pureebm/pureddpm_pood_narcissus_digits); ddpm_digits feeds pureddpm_narcissus_digits
LOADERS = {"ebm_digits": load_ebm, "ebm_narcissus_digits": load_ebm, "ebm_narcissus_all_digits": load_ebm,
           "ebm_sklearn8x8": load_ebm,
           "ebm_natural": load_ebm, "ddpm_digits": load_ddpm, "ddpm_sklearn8x8": load_ddpm}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One ``$LIT_ROBUST_DATA`` for the session: the tiny dataset trees, and the caches (poisons, surrogates,
    purified splits, filter masks) the runs share as real runs do."""
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, per_batch=10)
    write_mnist(root, "MNIST", n=24)
    write_mnist(root, "FashionMNIST", n=24)
    write_svhn(root, n=24)
    write_cinic10(root)
    write_imagenet(root, per_class=5, size=(64, 80), val_per_class=1)
    write_image_folder(root / "tiny-imagenet-200" / "train", classes=("n01443537", "n01629819"), per_class=4,
                       size=64)   # Narcissus' public OOD set for CIFAR-10
    return root


def _model_of(experiment: str, *overrides: str) -> L.LightningModule:
    GlobalHydra.instance().clear()
    with initialize_config_module(runner.CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "output_dir=unused", *overrides])
    return hydra.utils.instantiate(cfg.model, _convert_="all")


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> dict[str, list[str]]:
    """The overrides giving each experiment the weights its config requires, in the format it asks for: an
    ImageNet ViT-S state dict (3 channels, 1000 classes; the smoothed ViT adds its mask channel and a new head), a
    ``smoothed_vit_digits`` Lightning checkpoint, ``ddpm_digits`` and ``ebm_digits`` checkpoints (for every purifier
    read from ``outputs/``), a ``digits_classifier`` checkpoint, a ``bias_source_digits`` one."""
    root = tmp_path_factory.mktemp("weights")
    vit_s = root / "vit_small_patch16_224.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), vit_s)
    digits_vit = root / "smoothed_vit_digits.ckpt"
    torch.save({"state_dict": _model_of("smoothed_vit_digits").state_dict()}, digits_vit)
    ddpm = _model_of("ddpm_digits")
    ddpm_ckpt = root / "ddpm_digits.ckpt"
    torch.save({"state_dict": ddpm.state_dict(), "hyper_parameters": dict(ddpm.hparams),
                "pytorch-lightning_version": L.__version__}, ddpm_ckpt)
    ebm = _model_of("ebm_digits")
    ebm_ckpt = root / "ebm_digits.ckpt"
    torch.save({"state_dict": ebm.state_dict(), "hyper_parameters": dict(ebm.hparams),
                "pytorch-lightning_version": L.__version__}, ebm_ckpt)
    source = root / "digits_source.ckpt"
    torch.save({"state_dict": ImageClassifier(backbone="small_cnn", backbone_kwargs={"widths": [8, 16, 32]}).state_dict()},
               source)
    bias_source = root / "bias_source_digits.ckpt"
    torch.save({"state_dict": _model_of("bias_source_digits").state_dict()}, bias_source)
    classifier = _model_of("digits_classifier")
    classifier_ckpt = root / "digits_classifier.ckpt"
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams),
                "pytorch-lightning_version": L.__version__}, classifier_ckpt)
    return {"robust_transfer_digits": [f"model.weights_path={source}"],
            "bias_transfer_digits": [f"model.weights_path={bias_source}"],
            "smoothed_vit_cifar10": [f"model.weights_path={vit_s}"],
            "smoothed_vit_imagenet": [f"model.weights_path={vit_s}"],
            "patchcleanser_imagenet": [f"model.weights_path={vit_s}"],
            "smoothed_vit_digits_finetune": [f"model.weights_path={digits_vit}"],
            **{name: [f"callbacks.purification.ddpm={ddpm_ckpt}"] for name in (
                "pureddpm_narcissus_digits", "pureddpm_logo_digits", "pureddpm_pood_narcissus_digits")},
            **{name: [f"callbacks.purification.ebm={ebm_ckpt}"] for name in (
                "pureebm_pood_narcissus_digits", "pureebm_p_narcissus_digits")},
            "unadversarial_digits": [f"model.classifier_path={classifier_ckpt}"]}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_end_to_end_and_reports_its_headline_metrics(experiment, data_root, weights, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("LIT_ROBUST_DATA", str(data_root))
    monkeypatch.chdir(tmp_path)                         # cwd-relative caches (outputs/cache/...) stay in tmp
    patch_fixed_md5_checks(monkeypatch)
    metrics = runner.run_experiment(experiment, ["smoke=true", *weights.get(experiment, [])], tmp_path / "run")
    cfg = OmegaConf.load(tmp_path / "run" / "config.yaml")   # the run's resolved config
    assert cfg.headline_metrics, f"conf/experiment/{experiment}.yaml documents no headline_metrics"
    assert runner.check_headline_metrics(cfg, metrics) == [], (
        f"{experiment}: documented {list(cfg.headline_metrics)}, metrics.json has {sorted(metrics)}")
    assert all(math.isfinite(metrics[key]) for key in cfg.headline_metrics)
    if experiment in LOADERS:   # checkpoints that other experiments take load with the loader they use
        assert LOADERS[experiment](str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
