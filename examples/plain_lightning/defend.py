"""Drop lit_robust's defences into the project of ``project.py``, changing nothing but the callbacks' arguments.

    python defend.py purify spectral ispl certify patchcleanser adversarial missingness ood augment reuse loaders
        --out results.json [--raw] [--dict-items] [--alias] [--devices 2] [--workdir DIR]

``--raw`` gives the loader [0, 1] images (no ``Normalize``); otherwise the defences are told the loader's
normalisation with ``normalization=(MNIST_MEAN, MNIST_STD)``. A probe callback records what the trainer's train loader
really iterates at ``on_train_start``; rank zero writes the measurements of every defence named, as JSON, to ``--out``.
``augment`` purifies a randomly augmented split twice (one cache); ``reuse`` fits one DataModule with a filter, a
filter, nothing, a purification and nothing; ``loaders`` filters and purifies loaders given to ``trainer.fit`` and
loaders defined on the LightningModule.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch

from project import MNIST_MEAN, MNIST_STD, DigitImages, LitClassifier, MNISTDataModule, SelfContainedClassifier
from torchvision import transforms

from lit_robust import EBM, BayesianVAE
from lit_robust.callbacks.purification import chunk_seed
from lit_robust.callbacks import (AdversarialEvaluation, Certification, EBMPurification, MissingnessReport,
                                  OODDetection, PatchCleanserCertification, SpectralSignatureFilter, WeakLearnerFilter)

DEFENCES = ["purify", "spectral", "ispl", "certify", "patchcleanser", "adversarial", "missingness", "ood", "augment",
            "reuse", "loaders"]
EVALUATIONS = ("certify", "patchcleanser", "adversarial", "missingness")


def to_unit(image: torch.Tensor, normalized: bool) -> torch.Tensor:
    return image * MNIST_STD[0] + MNIST_MEAN[0] if normalized else image


class LoaderProbe(L.Callback):
    """What the train loader iterates: its length and, against the split as ``setup`` built it, the mean ℓ2 change
    of its first images in [0, 1] space."""

    def __init__(self, normalized: bool, count: int = 100, original=None):
        self.normalized, self.count, self.record, self.original = normalized, count, {}, original

    def on_fit_start(self, trainer, pl_module):  # runs before the defences (earlier in the callback list)
        if self.original is None:
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
    if name == "augment":
        return augmented_purification(args, workdir, contract)
    if name == "reuse":
        return reused_datamodule(args, workdir, contract)
    if name == "loaders":
        return given_loaders(args, workdir, contract)
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


class EpochProbe(L.Callback):
    """The first ``count`` images the train loader serves, read twice at the start of every epoch."""

    def __init__(self, count: int = 8):
        self.count, self.reads = count, []

    def on_train_epoch_start(self, trainer, pl_module):
        dataset = trainer.train_dataloader.dataset
        self.reads.append([torch.stack([dataset[i][0] for i in range(self.count)]) for _ in range(2)])

    def changed(self, first, second) -> int:
        return int(((first - second).flatten(1).abs().amax(1) > 1e-4).sum())


def purification(workdir: Path, contract: dict) -> EBMPurification:
    return EBMPurification(EBM.pretrained("digits"), steps=20, chunk_size=100, plots=False, progress=False,
                           cache_dir=str(workdir / "purified"), **contract)


def augmented_purification(args, workdir: Path, contract: dict) -> dict:
    """Purify a split whose transform is RandomAffine → ToTensor → Normalize, twice with one cache: what each epoch
    serves, how far the purified images are from purify(ToTensor(digit)) done by hand, and the chunks computed."""
    runs = []
    for _ in range(2):
        data, probe = MNISTDataModule(normalize=bool(contract), train_size=200, augment=True), EpochProbe()
        defence = purification(workdir, contract)
        trainer_for(args, [probe, defence], steps=2, limit_train_batches=1).fit(LitClassifier(), datamodule=data)
        runs.append((data, probe, defence))
    data, probe, defence = runs[0]
    digits = torch.stack([transforms.ToTensor()(data.mnist_train.pixels[i]) for i in range(100)])
    generator = torch.Generator().manual_seed(chunk_seed(defence.seed, 0))
    by_hand = defence.ebm.purify(digits, 20, generator=generator)[0]
    (first_read, second_read), (next_epoch, _) = probe.reads
    return {"changed_between_reads": probe.changed(first_read, second_read),
            "changed_between_epochs": probe.changed(first_read, next_epoch),
            "max_diff_to_purified_digits": (defence.installed.images[:100] - by_hand).abs().max().item(),
            "mean_l2_change": defence.stats["purify/mean_l2_change"],
            "chunks_computed": [run[2].stats["purify/chunks_computed_rank0"] for run in runs],
            "restored": all(run[0].mnist_train is run[2].installed.base for run in runs)}


def reused_datamodule(args, workdir: Path, contract: dict) -> dict:
    """One DataModule (setup() builds its splits once) fitted with a filter, a filter, no defence, a purification and
    no defence: the size of what each fit trained on, and whether the last fit saw the original digits."""
    data, sizes = MNISTDataModule(normalize=bool(contract), poison=0.3), []
    original = torch.stack([image for image, _ in _built(data).mnist_train])
    for callbacks in ([SpectralSignatureFilter(removal_fraction=0.3, feature_epochs=4, **contract)],
                      [SpectralSignatureFilter(removal_fraction=0.3, feature_epochs=4, **contract)], [],
                      [purification(workdir, contract)], []):
        trainer = trainer_for(args, callbacks)
        trainer.fit(LitClassifier(), datamodule=data)
        sizes.append(len(trainer.train_dataloader.dataset))
    last = trainer.train_dataloader.dataset
    return {"sizes": sizes, "last_fit_sees_original": bool(torch.equal(
        torch.stack([last[i][0] for i in range(len(last))]), original))}


def _built(data: MNISTDataModule) -> MNISTDataModule:
    data.setup("fit")
    return data


def given_loaders(args, workdir: Path, contract: dict) -> dict:
    """The filter and the purification on loaders given to trainer.fit(model, train, val) and on a LightningModule's
    own loaders: what the loop iterates (probe) and what the defence decided."""
    results = {}
    for style in ("fit", "module"):
        for name in ("purify", "spectral"):
            data = _built(MNISTDataModule(normalize=bool(contract), train_size=200,
                                          poison=0.3 if name == "spectral" else 0.0))
            probe = LoaderProbe(bool(contract), original=data.mnist_train)
            defence = (purification(workdir / style, contract) if name == "purify" else
                       SpectralSignatureFilter(removal_fraction=0.3, feature_epochs=4, **contract))
            trainer = trainer_for(args, [probe, defence])
            if style == "fit":
                trainer.fit(LitClassifier(), data.train_dataloader(), data.val_dataloader())
            else:
                trainer.fit(SelfContainedClassifier(data))
            decided = (defence.stats["purify/mean_l2_change"] if name == "purify" else
                       sorted((~defence.keep).nonzero().flatten().tolist()))
            results[f"{style}/{name}"] = {"probe": probe.record, "decided": decided}
    return results


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
