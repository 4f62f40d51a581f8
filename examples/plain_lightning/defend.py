"""Drop lit_robust's defences into the project of ``project.py``, changing nothing but the callbacks' arguments.

    python defend.py purify spectral ispl certify patchcleanser adversarial missingness ood --out results.json [--raw]
        [--dict-items] [--alias] [--devices 2] [--workdir DIR]

``--raw`` gives the loader [0, 1] images (no ``Normalize``); otherwise the defences are told the loader's
normalisation with ``normalization=(MNIST_MEAN, MNIST_STD)``. A probe callback records what the trainer's train loader
really iterates at ``on_train_start``; rank zero writes the measurements of every defence named, as JSON, to ``--out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch

from project import MNIST_MEAN, MNIST_STD, DigitImages, LitClassifier, MNISTDataModule

from lit_robust import EBM, BayesianVAE
from lit_robust.callbacks import (AdversarialEvaluation, Certification, EBMPurification, MissingnessReport,
                                  OODDetection, PatchCleanserCertification, SpectralSignatureFilter, WeakLearnerFilter)

DEFENCES = ["purify", "spectral", "ispl", "certify", "patchcleanser", "adversarial", "missingness", "ood"]
EVALUATIONS = ("certify", "patchcleanser", "adversarial", "missingness")


def to_unit(image: torch.Tensor, normalized: bool) -> torch.Tensor:
    return image * MNIST_STD[0] + MNIST_MEAN[0] if normalized else image


class LoaderProbe(L.Callback):
    """What the train loader iterates: its length and, against the split as ``setup`` built it, the mean ℓ2 change
    of its first images in [0, 1] space."""

    def __init__(self, normalized: bool, count: int = 100):
        self.normalized, self.count, self.record = normalized, count, {}

    def on_fit_start(self, trainer, pl_module):  # runs before the defences (earlier in the callback list)
        self.original = trainer.datamodule.mnist_train

    def on_train_start(self, trainer, pl_module):
        dataset = trainer.train_dataloader.dataset
        image = lambda item: to_unit((item["image"] if isinstance(item, dict) else item[0]), self.normalized)  # noqa
        count = min(self.count, len(dataset))
        change = None  # a filtered split has other items: no per-item change
        if len(dataset) == len(self.original):
            change = torch.stack([(image(dataset[i]) - image(self.original[i])).flatten().norm()
                                  for i in range(count)]).mean().item()
        first = torch.stack([image(dataset[i]) for i in range(count)])
        self.record = {"loader_len": len(dataset), "original_len": len(self.original), "loader_l2_change": change,
                       "loader_min": first.min().item(), "loader_max": first.max().item()}


def trainer_for(args, callbacks, steps: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                     max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.workdir,
                     limit_val_batches=0, **kwargs)


def trained_classifier(data) -> LitClassifier:
    """The project's classifier trained in one process, so that 1 and 2 processes evaluate the same model."""
    model = LitClassifier()
    L.Trainer(accelerator="cpu", devices=1, max_steps=60, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(model, datamodule=data)
    return model


def test_time_defence(name: str, workdir: Path, contract: dict):
    """The callbacks that evaluate a trained model on the test split the loader reads."""
    if name == "certify":
        return Certification(output_dir=str(workdir), kind="column", width=12, stride=2, patch_sizes=[2, 4],
                             **contract)
    if name == "patchcleanser":
        return PatchCleanserCertification(output_dir=str(workdir), patch_sizes=[2, 4], k=3, **contract)
    if name == "missingness":
        return MissingnessReport(output_dir=str(workdir), region=7, fractions=[0.25, 0.5], batch_size=64,
                                 lime_samples=32, **contract)
    return AdversarialEvaluation(output_dir=str(workdir), epsilons=[0.05, 0.3], attacks=["pgd", "apgd-ce"],
                                 pgd_steps=10, apgd_steps=10, num_images=100, batch_size=32, **contract)


def run_defence(name: str, args, normalized: bool) -> dict:
    """Fit (or test) the project with one defence; the measurements a user would look at."""
    contract = {"normalization": (MNIST_MEAN, MNIST_STD)} if normalized else {}
    data = MNISTDataModule(normalize=normalized, dict_items=args.dict_items, alias_train=args.alias,
                           poison=0.3 if name in ("spectral", "ispl") else 0.0)
    workdir = Path(args.workdir) / name
    L.seed_everything(0)
    probe = LoaderProbe(normalized)
    if name == "purify":
        defence = EBMPurification(EBM.pretrained("digits"), steps=20, chunk_size=150, plots=False, progress=False,
                                  cache_dir=str(workdir / "purified"), **contract)
        trainer_for(args, [probe, defence]).fit(LitClassifier(), datamodule=data)
        return {"mean_l2_change": defence.stats["purify/mean_l2_change"], "probe": probe.record}
    if name in ("spectral", "ispl"):
        defence = (SpectralSignatureFilter(removal_fraction=0.3, feature_epochs=4, **contract)
                   if name == "spectral" else
                   WeakLearnerFilter(runs=2, rounds=4, learner_epochs=20, self_train_epochs=20, **contract))
        trainer_for(args, [probe, defence]).fit(LitClassifier(), datamodule=data)
        removed = set((~defence.keep).nonzero().flatten().tolist())
        planted = set(data.poisoned_indices.tolist())
        return {"removed": len(removed), "planted": len(planted), "probe": probe.record,
                "recall": len(planted & removed) / max(1, len(planted))}
    if name in EVALUATIONS:
        model = trained_classifier(data)
        metrics = trainer_for(args, [test_time_defence(name, workdir, contract)]).test(model, datamodule=data,
                                                                                      verbose=False)[0]
        return {k: float(v) for k, v in metrics.items()}
    detector = BayesianVAE(img_size=28, latent_dim=4, hidden_dims=(64,), num_draws=3, num_importance=4)
    L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
        detector, datamodule=MNISTDataModule(normalize=False))
    noise = DigitImages(torch.randint(0, 256, (200, 28, 28), generator=torch.Generator().manual_seed(0))
                        .to(torch.uint8).numpy(), torch.zeros(200, dtype=torch.long).numpy(), data.transform,
                        args.dict_items)
    defence = OODDetection(detector=detector, ood_datasets={"noise": noise}, encoder_eps=None, classifier_eps=None,
                           restoration_steps=0, histograms=False, output_dir=str(workdir), **contract)
    metrics = trainer_for(args, [defence]).test(LitClassifier(), datamodule=data, verbose=False)[0]
    return {k: float(v) for k, v in metrics.items() if k.endswith("/auroc") or k.endswith("/count")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("defences", nargs="+", choices=DEFENCES)
    parser.add_argument("--out", required=True)
    parser.add_argument("--raw", action="store_true")
    parser.add_argument("--dict-items", action="store_true")
    parser.add_argument("--alias", action="store_true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    results = {name: run_defence(name, args, normalized=not args.raw) for name in args.defences}
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
