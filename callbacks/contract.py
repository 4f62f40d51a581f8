"""The one contract every defence callback follows, so that it works in a Lightning project written the usual way.

- **Which split**: the dataset the trainer's loader really iterates. By default the callback calls the DataModule's
  ``<stage>_dataloader()`` and takes its ``.dataset``; ``split=`` names the DataModule attribute instead (a string,
  e.g. ``"mnist_train"``) or returns the dataset (a callable of the DataModule).
- **Which item format**: ``(image, target, ...)`` tuples, or dicts whose image and target keys are found among common
  names (``image``/``img``/``x``…, ``label``/``target``/``y``…) or given as ``item_keys=("pixels", "digit")``.
- **Which pixel space**: defences work on images in [0, 1]. A loader that normalises declares it with
  ``normalization=(mean, std)`` (the values of its ``Normalize``) or a pair of callables ``(to_unit, from_unit)``;
  the callback undoes it before its model and redoes it after. Without a declaration, images outside [0, 1] are
  refused before any work.
- **Replacing a split**: every DataModule attribute holding the split the loader reads is set to the replacement, the
  loader hook is called again to prove it now returns the replacement, and ``on_train_start`` checks that the
  trainer's own train loader iterates it; otherwise the error names the attribute the loader reads.
- **Shapes**: images are checked against the model's ``in_chans`` / ``img_size`` before any work.
- **DDP**: work is shared out by :func:`rank_batches` (rank r takes batches r, r + W, … of the single-process
  batching) and put back in order by :func:`gather_in_order` (uneven shares are fine), so every rank ends with the
  single-process result.
- **Outputs**: files go to ``output_dir``, else the trainer's ``default_root_dir`` when it was set, else its
  ``log_dir`` (never the bare working directory); metrics go through ``log_dict`` (every logger, and
  ``metrics.json`` through :class:`~lit_robust.callbacks.MetricsFile`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics.utilities.distributed import gather_all_tensors

from lit_robust.datamodules.base import TensorImageDataset
from lit_robust.pixel_space import PixelSpace

IMAGE_KEYS = ("image", "img", "images", "x", "input", "inputs", "pixel_values")
TARGET_KEYS = ("label", "target", "labels", "targets", "y", "class", "cls")
LOADER_HOOKS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
SETUP_STAGES = {"train": ("fit",), "val": ("validate", "fit"), "test": ("test",)}  # stage-split setup() tried in turn


# ---- items ----------------------------------------------------------------------------------------------------------
class ItemFormat:
    """Reads ``(image, target)`` from a dataset item and puts a new image back into it, keeping every other field."""

    def __init__(self, item_keys: tuple | None = None):
        self.item_keys = tuple(item_keys) if item_keys is not None else None

    def keys(self, item) -> tuple:
        if self.item_keys is not None:
            return self.item_keys
        if isinstance(item, Mapping):
            image = next((k for k in IMAGE_KEYS if k in item), None)
            target = next((k for k in TARGET_KEYS if k in item), None)
            if image is None or target is None:
                raise KeyError(f"dataset items are dicts with keys {sorted(item)}: pass item_keys=(image_key, "
                               "target_key) to the callback")
            return image, target
        if isinstance(item, Sequence) and len(item) >= 2:
            return 0, 1
        raise TypeError(f"dataset items are {type(item).__name__}: the defences read (image, target, ...) tuples or "
                        "dicts; pass item_keys=(image_key, target_key)")

    def read(self, item) -> tuple[torch.Tensor, torch.Tensor]:
        image_key, target_key = self.keys(item)
        return torch.as_tensor(item[image_key]), torch.as_tensor(item[target_key])

    def with_image(self, item, image: torch.Tensor):
        image_key = self.keys(item)[0]
        if isinstance(item, Mapping):
            return {**item, image_key: image}
        fields = list(item)
        fields[image_key] = image
        return tuple(fields) if isinstance(item, tuple) else fields

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch (images, targets) of items."""
        pairs = [self.read(item) for item in items]
        return torch.stack([image for image, _ in pairs]), torch.stack([target for _, target in pairs])

    def stack(self, dataset: Dataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """All (images, targets) of ``dataset`` as two tensors."""
        if isinstance(dataset, TensorImageDataset):
            return dataset.images, dataset.targets
        if len(dataset) == 0:
            raise ValueError("the split is empty: check the DataModule's setup() and the split the callback reads")
        parts = list(DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.collate))
        return torch.cat([images for images, _ in parts]), torch.cat([targets for _, targets in parts])


class ReplacedImages(Dataset):
    """The items of ``base`` with each image replaced by ``images[i]`` (in the loader's pixel space), every other
    field of the item kept."""

    def __init__(self, base: Dataset, images: torch.Tensor, item_format: ItemFormat):
        if len(base) != len(images):
            raise ValueError(f"{len(images)} replacement images for a dataset of {len(base)}")
        self.base, self.images, self.item_format = base, images, item_format

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.item_format.with_image(self.base[index], self.images[index])


# ---- splits ---------------------------------------------------------------------------------------------------------
def _first_loader(loaders):
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence) and loaders and isinstance(loaders[0], DataLoader):
        return loaders[0]
    return None


class SplitRef:
    """A split of the trainer's DataModule: the dataset, the attributes that hold it, and how to prove a replacement
    reaches the loader."""

    def __init__(self, trainer: L.Trainer, stage: str, split: str | Callable | None, user: str):
        if stage not in LOADER_HOOKS:
            raise ValueError(f"stage {stage!r}: use one of {sorted(LOADER_HOOKS)}")
        self.stage, self.user, self.hook = stage, user, LOADER_HOOKS[stage]
        self.datamodule = trainer.datamodule
        if self.datamodule is None:
            raise RuntimeError(f"{user} reads the {stage} split from a LightningDataModule, and this trainer has none: "
                               f"pass datamodule=your_datamodule to trainer.{SETUP_STAGES[stage][0]}(...) (loaders "
                               "passed directly cannot be read or replaced)")
        self.dataset = self._resolve(split)
        self.attributes = [name for name, value in vars(self.datamodule).items() if value is self.dataset]

    def loader_dataset(self):
        """The dataset that the DataModule's loader hook returns now (None when it gives no loader yet)."""
        try:
            loader = _first_loader(getattr(self.datamodule, self.hook)())
        except Exception as error:  # noqa: BLE001 — typically setup() for this stage has not built the split yet
            self.hook_error = error
            return None
        return None if loader is None else loader.dataset

    def _resolve(self, split) -> Dataset:
        name, stages = type(self.datamodule).__name__, SETUP_STAGES[self.stage]
        self.hook_error = None
        if callable(split):
            dataset = split(self.datamodule)
        elif isinstance(split, str):
            for stage in stages:
                if getattr(self.datamodule, split, None) is None:
                    self.datamodule.setup(stage)
            dataset = getattr(self.datamodule, split, None)
            if dataset is None:
                raise AttributeError(f"{self.user}: {name} has no {self.stage} split in attribute {split!r} after "
                                     f"setup({', '.join(map(repr, stages))}): name the attribute that holds it "
                                     f"({self._candidates()})")
        else:
            dataset = self.loader_dataset()
            for stage in stages:  # a setup() split by stage may not have built this split in the current run
                if dataset is None:
                    self.datamodule.setup(stage)
                    dataset = self.loader_dataset()
            if dataset is None:
                raise RuntimeError(f"{self.user} needs the {self.stage} split, but {name}.{self.hook}() gives no "
                                   f"loader after setup({', '.join(map(repr, stages))})"
                                   + (f" ({type(self.hook_error).__name__}: {self.hook_error})" if self.hook_error
                                      else "") + f": implement {self.hook}() or pass the split's attribute name "
                                   f"({self._candidates()})")
        if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise ValueError(f"{self.user}: the {self.stage} split of {name} is empty or has no length")
        return dataset

    def _candidates(self) -> str:
        names = [k for k, v in vars(self.datamodule).items() if isinstance(v, Dataset)]
        return "dataset attributes: " + (", ".join(names) if names else "none")

    def replace(self, replacement: Dataset) -> None:
        """Install ``replacement`` in every attribute holding the split and prove the loader hook now returns it."""
        name = type(self.datamodule).__name__
        if not self.attributes:
            raise RuntimeError(f"{self.user} cannot replace the {self.stage} split: {name}.{self.hook}() builds its "
                               "dataset anew on each call; build it once in setup() and keep it in an attribute "
                               "that the loader reads")
        for attribute in self.attributes:
            setattr(self.datamodule, attribute, replacement)
        if self.loader_dataset() is not replacement:
            reads = self.reads_attribute()
            raise RuntimeError(f"{self.user} replaced {name}.{', '.join(self.attributes)}, but {name}.{self.hook}() "
                               f"still reads {reads or 'another dataset'}: pass split='{reads}' (the attribute the "
                               "loader reads)" if reads else "or make the loader read the split's attribute")

    def reads_attribute(self) -> str | None:
        dataset = self.loader_dataset()
        return next((k for k, v in vars(self.datamodule).items() if v is dataset and dataset is not None), None)


def evaluated_split(trainer: L.Trainer, stage: str, split: str | Callable | None, user: str) -> Dataset:
    """The dataset the trainer's ``stage`` loop iterates now (``trainer.val_dataloaders`` / ``test_dataloaders``),
    else the DataModule's split found as :class:`SplitRef` does."""
    if split is None:
        loader = _first_loader({"val": trainer.val_dataloaders, "test": trainer.test_dataloaders}.get(stage))
        if loader is not None:
            return loader.dataset
    return SplitRef(trainer, stage, split, user).dataset


def _builds_on(dataset, installed: Dataset, depth: int = 8) -> bool:
    """Whether ``dataset`` is ``installed`` or wraps it (``Subset.dataset``, ``ReplacedImages.base``), as when a
    later defence replaces the split an earlier one installed."""
    for _ in range(depth):
        if dataset is installed:
            return True
        dataset = getattr(dataset, "base", None) or getattr(dataset, "dataset", None)
    return False


def check_train_loader_reads(trainer: L.Trainer, installed: Dataset, user: str) -> None:
    """At ``on_train_start``: the trainer's own train loader must iterate ``installed`` (or a later defence's
    replacement built on it)."""
    loader = _first_loader(trainer.train_dataloader)
    if loader is None or _builds_on(loader.dataset, installed):
        return
    dm = trainer.datamodule
    reads = next((k for k, v in vars(dm).items() if v is loader.dataset), None) if dm is not None else None
    raise RuntimeError(f"{user} installed its train split, but the trainer's train loader iterates another dataset"
                       + (f" ({type(dm).__name__}.{reads})" if reads else "") +
                       ": pass split= naming the attribute that train_dataloader() reads")


# ---- shapes ---------------------------------------------------------------------------------------------------------
def check_image_shape(images: torch.Tensor, model, user: str, model_name: str = "model") -> None:
    """Channels and (where the model is built for one size) the side of the images against the model's hparams."""
    hparams = getattr(model, "hparams", {}) or {}
    channels, size = images.shape[1], tuple(images.shape[-2:])
    in_chans, img_size = hparams.get("in_chans"), hparams.get("img_size")
    if in_chans is not None and channels != in_chans:
        raise ValueError(f"{user}: the split has {channels}-channel images but the {model_name} takes in_chans="
                         f"{in_chans}: use a {model_name} trained on {channels}-channel images of this data")
    if img_size is not None and size != (img_size, img_size):
        raise ValueError(f"{user}: the split has {size[0]}×{size[1]} images but the {model_name} was built for "
                         f"img_size={img_size}: resize in the DataModule (transforms.Resize({img_size})) or use a "
                         f"{model_name} trained at {size[0]}×{size[1]}")


# ---- DDP ------------------------------------------------------------------------------------------------------------
def rank_share(count: int, trainer: L.Trainer) -> torch.Tensor:
    """The items this rank works on: r, r + W, r + 2W, … (every item on exactly one rank)."""
    return torch.arange(trainer.global_rank, count, trainer.world_size)


def rank_batches(count: int, batch_size: int, trainer: L.Trainer):
    """Row indices of this rank's batches: batch b holds items [b·B, (b + 1)·B) and rank r takes batches r, r + W, … —
    the very batches one process forms, so a model whose output depends on its batch (seeded draws per call, a
    chunk's noise seed) gives the single-process result."""
    for batch in rank_share(math.ceil(count / batch_size), trainer).tolist():
        yield torch.arange(batch * batch_size, min((batch + 1) * batch_size, count))


def shard_batches(dataset: Dataset, trainer: L.Trainer, batch_size: int, item_format: ItemFormat):
    """This rank's batches of ``dataset`` (:func:`rank_batches`) as ``(indices, images, targets)``, images in the
    loader's space."""
    for rows in rank_batches(len(dataset), batch_size, trainer):
        yield (rows, *item_format.collate([dataset[i] for i in rows.tolist()]))


def gather_in_order(local: torch.Tensor, indices: torch.Tensor, trainer: L.Trainer) -> torch.Tensor:
    """Every rank's ``local`` rows (row i is item ``indices[i]``) gathered and sorted by item index; on one process,
    the rows sorted. The result is the same on every rank."""
    if trainer.world_size > 1:
        device = trainer.strategy.root_device
        local = torch.cat(gather_all_tensors(local.contiguous().to(device)))
        indices = torch.cat(gather_all_tensors(indices.contiguous().to(device)))
    return local[indices.argsort().to(local.device)]


# ---- outputs --------------------------------------------------------------------------------------------------------
def output_folder(trainer: L.Trainer, output_dir: str | Path | None) -> Path:
    """``output_dir`` if given, else the trainer's ``default_root_dir`` when set, else its ``log_dir``, else
    ``<default_root_dir>/lit_robust_outputs`` — never the bare working directory of a plain ``Trainer()``."""
    if output_dir is not None:
        return Path(output_dir)
    root = Path(trainer.default_root_dir)
    if root.resolve() != Path(os.getcwd()).resolve():
        return root
    if trainer.loggers and trainer.log_dir:
        return Path(trainer.log_dir)
    return root / "lit_robust_outputs"


# ---- the base of the callbacks that replace the train split ---------------------------------------------------------
class TrainSplitDefence(L.Callback):
    """Base of purification and data filters: read the split the train loader iterates at ``on_fit_start`` (after a
    resumed fit restored this callback's state, before any train loader exists), install the replacement, prove at
    ``on_train_start`` that the trainer iterates it, and log the defence's numbers once per training epoch.

    Args:
        split: the DataModule attribute holding the train split (e.g. ``"mnist_train"``) or a callable returning it;
            default: the dataset ``train_dataloader()`` returns.
        item_keys: ``(image_key, target_key)`` of dict items (default: common names; tuples use positions 0 and 1).
        normalization: ``(mean, std)`` of the loader's ``Normalize``, or ``(to_unit, from_unit)`` callables; the
            defence works in [0, 1] and hands back images in the loader's space.
        output_dir: where plots and records go (see :func:`output_folder`).
    """

    def __init__(self, split: str | Callable | None = None, item_keys: tuple | None = None, normalization=None,
                 output_dir: str | None = None):
        self.split, self.output_dir = split, output_dir
        self.item_format = ItemFormat(item_keys)
        self.pixel_space = PixelSpace(normalization, type(self).__name__)
        self.installed: Dataset | None = None
        self.stats: dict[str, float] = {}

    def train_split(self, trainer: L.Trainer) -> SplitRef:
        """The train split the loader reads."""
        return SplitRef(trainer, "train", self.split, type(self).__name__)

    def unit_images(self, ref: SplitRef) -> tuple[torch.Tensor, torch.Tensor]:
        """All images of the split in [0, 1] and its targets."""
        images, targets = self.item_format.stack(ref.dataset)
        return self.pixel_space.to_unit(images), targets

    def install(self, ref: SplitRef, replacement: Dataset) -> None:
        ref.replace(replacement)
        self.installed = replacement

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.installed is not None:
            check_train_loader_reads(trainer, self.installed, type(self).__name__)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stats:  # the same on every rank (computed from gathered results)
            pl_module.log_dict(self.stats, on_step=False, on_epoch=True, sync_dist=False)


class SplitEvaluation(L.Callback):
    """A callback that evaluates the val and/or test split at the end of that loop's epoch (not during the sanity
    check): subclasses implement :meth:`evaluate`, which returns the flat metrics it logged."""

    def __init__(self, splits: Sequence[str], user: str):
        bad = set(splits) - {"val", "test"}
        if bad:
            raise ValueError(f"{user} splits {sorted(bad)}: use 'val' and/or 'test'")
        self.splits = list(splits)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> dict[str, float]:
        raise NotImplementedError

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "val" in self.splits and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test" in self.splits:
            self.evaluate(trainer, pl_module, "test")
