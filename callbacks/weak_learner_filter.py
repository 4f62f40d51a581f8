"""Data-filter callbacks: before fit, decide which training samples to keep and shrink the train split the loader
reads.

``TrainingSetFilter`` is the thin shared part (read the train split through :mod:`lit_robust.callbacks.contract`,
call ``select`` on its [0, 1] images, agree across ranks, install the kept subset, log counts and — where the
DataModule carries a poison manifest — removal precision and recall). ``WeakLearnerFilter`` is seed 003's defence
(ISPL + boosting of weak learners, ``lit_robust.functional.ispl``); the baselines of its Table 1 override only ``select``
(``lit_robust.callbacks.baseline_filters``). Usable in any Lightning ``Trainer`` and DataModule (split, item format
and normalisation as in the contract).

Logged once per training epoch (so they reach loggers and ``metrics.json``): ``filter/removed``, ``filter/kept`` and,
with a poison manifest, ``filter/poisons``, ``filter/precision`` (removed samples that are poisons),
``filter/recall`` (poisons removed) and ``filter/clean_kept`` (clean samples kept). The manifest is read from
``PoisonedDataModule.poison_mask``.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import Subset
from typing_extensions import override

from lit_robust.callbacks.contract import TrainSplitDefence
from lit_robust.functional.ispl import (ISPLSchedule, fit_component_learners, ispl_partition, modal_vote_agrees,
                                        self_training)
from lit_robust.functional.weak_learners import flatten_images
from lit_robust.storage.cache import check_writable, fingerprint, load_verified, save_atomic


def poison_mask_of(datamodule, size: int) -> torch.Tensor | None:
    """Boolean (size,) mask of the poisoned training samples from the DataModule's manifest
    (``PoisonedDataModule.poison_mask``), or None when it has none or it does not match the train split."""
    mask = getattr(datamodule, "poison_mask", None)
    if mask is None or len(mask) != size:
        return None
    return torch.as_tensor(mask, dtype=torch.bool).cpu()


def removal_stats(keep: torch.Tensor, is_poison: torch.Tensor | None) -> dict[str, float]:
    """Counts of a filter's decision and, given ground truth, precision/recall of the removal."""
    stats = {"filter/removed": float((~keep).sum()), "filter/kept": float(keep.sum())}
    if is_poison is not None:
        removed_poisons = float((~keep & is_poison).sum())
        stats.update({"filter/poisons": float(is_poison.sum()),
                      "filter/precision": removed_poisons / max(1.0, stats["filter/removed"]),
                      "filter/recall": removed_poisons / max(1.0, float(is_poison.sum())),
                      "filter/clean_kept": float((keep & ~is_poison).sum()) / max(1.0, float((~is_poison).sum()))})
    return stats


class TrainingSetFilter(TrainSplitDefence):
    """Base of the data filters: subclasses implement ``select(inputs, labels, num_classes, trainer) → keep mask``.

    Runs at ``on_fit_start`` (after a checkpoint's callback state is restored, before any train loader exists): a
    resumed fit reuses the stored mask instead of filtering again. ``select`` runs on every rank (a subclass may
    shard its work and gather); rank 0's mask is broadcast so all ranks train on the same subset. With
    ``cache_dir`` the mask is cached (``lit_robust.storage.cache``, keyed by the filter's parameters, the train split and the
    world size), so repeated runs on the same data skip the filtering. ``contract`` takes the shared keywords
    ``split``, ``item_keys``, ``normalization``, ``output_dir`` (:class:`TrainSplitDefence`).
    """

    def __init__(self, seed: int = 0, cache_dir: str | None = None, **contract):
        super().__init__(**contract)
        self.seed = seed
        self.cache_dir = cache_dir
        self.keep: torch.Tensor | None = None

    @override
    def state_key_fields(self) -> dict:
        return {"seed": self.seed}

    def select(self, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, trainer: L.Trainer) -> torch.Tensor:
        raise NotImplementedError

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit filters the data it is given; a resumed one gets its mask from the checkpoint
            self.keep = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ref = self.train_split(trainer)
        if self.keep is None:  # a resumed fit restored its mask: no need to read the images again
            images, labels = self.unit_images(ref)
            self.keep = self._cached_or_selected(images, labels.long(), trainer.datamodule, trainer)
        if len(self.keep) != len(ref.dataset):
            raise RuntimeError(f"{type(self).__name__} holds a mask for {len(self.keep)} samples but the train split "
                               f"has {len(ref.dataset)}; the data changed since the checkpoint — resume with the same "
                               "data")
        self.stats = removal_stats(self.keep, poison_mask_of(trainer.datamodule, len(ref.dataset)))
        self.install(ref, Subset(ref.dataset, self.keep.nonzero().squeeze(1).tolist()))

    def _cached_or_selected(self, images, labels, datamodule, trainer) -> torch.Tensor:
        """The keep mask from rank 0's verified cache entry, else from ``select`` (all ranks), then cached."""
        path = None
        if self.cache_dir is not None:
            params = {k: v for k, v in vars(self).items()
                      if k not in ("keep", "stats", "cache_dir", "installed", "replaced", "augmentation", "split",
                                   "item_format", "pixel_space", "output_dir") and not callable(v)}
            key = fingerprint(type(self).__name__, params, trainer.world_size, images, labels)
            path = check_writable(self.cache_dir, "cache_dir") / f"{type(self).__name__}-{key}.pt"
        cached = load_verified(path) if path is not None and trainer.is_global_zero else None
        if trainer.strategy.broadcast(cached is not None, src=0):
            return trainer.strategy.broadcast(cached, src=0)
        num_classes = int(getattr(datamodule, "num_classes", None) or int(labels.max()) + 1)
        with torch.random.fork_rng():  # weights drawn from the filter's own seed, whatever ran before: Lightning
            torch.manual_seed(self.seed)  # reseeds the global RNG when DDP starts, so it differs from one process
            keep = self.select(flatten_images(images), labels, num_classes, trainer).cpu()
        keep = trainer.strategy.broadcast(keep, src=0)
        if path is not None and trainer.is_global_zero:
            save_atomic(path, keep)
        return keep

    def state_dict(self) -> dict:
        return {"keep": self.keep}

    def load_state_dict(self, state_dict: dict) -> None:
        self.keep = state_dict.get("keep")


class WeakLearnerFilter(TrainingSetFilter):
    """Seed 003's defence: ISPL partitions the training set into homogeneous components (``runs`` independent
    times), a weak learner per component votes on every sample, samples whose label loses the vote are removed, and a
    final self-training pass re-admits clean samples (Algorithms 1–2, App. B; ``lit_robust.functional.ispl``).

    Under DDP every rank runs the whole filter from the same seed (the runs' weak learners are trained together
    as one ensemble, so sharding runs over ranks would change the result): 2 processes keep exactly the samples
    one process keeps.

    Cost: on the 3,500 training digits of ``ispl_badnets_digits`` (28×28, defaults below) the whole filter takes
    ≈ 2 min on two shared CPU cores (measured with a load average of 12–15).

    Args mirror ``lit_robust.functional.ispl.ISPLSchedule`` (App. B values except the weak learners' size and epochs; see
    ``lit_robust.functional.weak_learners`` for why), plus ``runs`` (3 in the paper: 3 × 8 = 24 weak learners).
    """

    def __init__(self, runs: int = 3, rounds: int = 8, alpha: float = 0.25, eta: float = 0.9, warmup_epochs: int = 8,
                 epochs: int = 4, class_floor: float = 0.125, learner_epochs: int = 20, self_train_epochs: int = 40,
                 resample_every: int = 5, self_train_momentum: float = 0.8, hidden: int = 256, lr: float = 1e-3,
                 batch_size: int = 64, seed: int = 0, cache_dir: str | None = None, **contract):
        super().__init__(seed, cache_dir, **contract)
        if runs < 1:
            raise ValueError(f"runs={runs}: need at least one ISPL run")
        self.runs = runs
        self.schedule = ISPLSchedule(rounds=rounds, alpha=alpha, eta=eta, warmup_epochs=warmup_epochs, epochs=epochs,
                                     class_floor=class_floor, learner_epochs=learner_epochs,
                                     self_train_epochs=self_train_epochs, resample_every=resample_every,
                                     self_train_momentum=self_train_momentum, hidden=hidden, lr=lr,
                                     batch_size=batch_size)

    def select(self, inputs, labels, num_classes, trainer):
        generator = torch.Generator().manual_seed(self.seed * 7919)
        components = ispl_partition(inputs, labels, self.runs, self.schedule, num_classes, generator)
        predictions = fit_component_learners(inputs, labels, components, self.schedule, num_classes, generator)
        generator = torch.Generator().manual_seed(self.seed)
        keep = modal_vote_agrees(predictions, labels, num_classes, generator)
        return self_training(inputs, labels, keep, self.schedule, num_classes, generator)
