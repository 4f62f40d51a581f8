"""The one contract every defence callback follows, so that it works in a Lightning project written the usual way.

- **Which split**: the dataset the trainer's loader really iterates, wherever the loader comes from: the DataModule's
  ``<stage>_dataloader()``, the LightningModule's own ``<stage>_dataloader()``, or loaders passed to
  ``trainer.fit(model, train_loader, val_loader)``. ``split=`` names the DataModule's (or module's) attribute instead
  (a string, e.g. ``"mnist_train"``) or returns the dataset (a callable of the DataModule).
- **Which item format**: ``(image, target, ...)`` tuples, or dicts whose image and target keys are found among common
  names (``image``/``img``/``x``…, ``label``/``target``/``y``…) or given as ``item_keys=("pixels", "digit")``.
- **Which pixel space**: defences work on images in [0, 1]. A loader that normalises declares it with
  ``normalization=(mean, std)`` (the values of its ``Normalize``) or a pair of callables ``(to_unit, from_unit)``;
  the callback undoes it before its model and redoes it after. Without a declaration, images outside [0, 1] are
  refused before any work.
- **Random augmentation** (items that differ between two reads): the defences read the un-augmented images — the
  deterministic part of the dataset's ``transform`` (:mod:`lit_robust.callbacks.augmentation`) — and a purified split
  still runs the random transforms on every read; an augmentation that cannot be separated is refused before any
  work, naming how to structure the transform.
- **Replacing a split**: every attribute of the DataModule (or LightningModule) holding the split the loader reads is
  set to the replacement and the loader hook is called again to prove it now returns it; where no attribute holds it
  (loaders passed to ``fit``, ``LightningDataModule.from_datasets``, a hook that builds its dataset anew) the loader
  is rebuilt around the replacement as the loop's data source, or — a loader that cannot be rebuilt — refused before
  any work. ``on_train_start`` checks that the trainer's own train loader iterates the replacement.
- **Leaving the user's objects as they were**: every attribute or data source a defence replaced is put back at the
  end of fit, on an exception and at teardown, so a DataModule reused for another run yields its original data.
- **Shapes**: images are checked against the model's ``in_chans`` / ``img_size`` before any work.
- **DDP**: every evaluation runs :func:`shard_map`: work is shared out by :func:`rank_batches` (rank r takes batches
  r, r + W, … of the single-process batching) and put back in order by :func:`gather_in_order` (uneven shares are
  fine), so every rank ends with the single-process result; a rank without work contributes zero rows shaped as the
  other ranks' outputs.
- **Outputs**: files go to ``output_dir``, else the trainer's ``default_root_dir`` when it was set, else its
  ``log_dir`` (never the bare working directory); metrics go through ``log_dict`` (every logger, and
  ``metrics.json`` through :class:`~lit_robust.callbacks.MetricsFile`).
- **The bases**: every callback that reads a split derives from :class:`ContractCallback` (item format, pixel space,
  split setting, output folder, shape check, state key): :class:`TrainSplitDefence` (purification, filters),
  :class:`SplitEvaluation` (val/test evaluations), :class:`RankZeroReport` (reports computed whole on rank zero,
  logged on every rank), or the base itself (OOD detection, the shift and poison sweeps, the latent grid).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torchmetrics.utilities.distributed import gather_all_tensors
from typing_extensions import override

from lit_robust.callbacks.augmentation import SeparatedAugmentation, separate_augmentation
from lit_robust.datasets import TensorImageDataset
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

    def image(self, item):
        """The image field of ``item`` as the dataset gives it (a tensor, or a PIL image before ``ToTensor``)."""
        return item[self.keys(item)[0]]

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
    """The items of ``base`` with each image replaced by ``images[i]`` (in the loader's pixel space) — or by
    ``augment(images[i])``, a fresh random draw on every read, where ``images`` are un-augmented — every other field of
    the item kept."""

    def __init__(self, base: Dataset, images: torch.Tensor, item_format: ItemFormat, augment: Callable | None = None):
        if len(base) != len(images):
            raise ValueError(f"{len(images)} replacement images for a dataset of {len(base)}")
        self.base, self.images, self.item_format, self.augment = base, images, item_format, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        return self.item_format.with_image(self.base[index], image if self.augment is None else self.augment(image))


# ---- splits ---------------------------------------------------------------------------------------------------------
def _first_loader(loaders):
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence) and loaders and isinstance(loaders[0], DataLoader):
        return loaders[0]
    return None


def _loop_source(trainer: L.Trainer, stage: str):
    """The loop's ``_DataLoaderSource`` (Lightning 2.x): a DataModule, the LightningModule or the loaders given."""
    if stage == "train":
        loop = trainer.fit_loop
    elif stage == "val":
        loop = trainer.fit_loop.epoch_loop.val_loop if trainer.state.fn == TrainerFn.FITTING else trainer.validate_loop
    else:
        loop = trainer.test_loop
    return loop._data_source


def rebuilt_loader(loader, dataset: Dataset, user: str) -> DataLoader:
    """A plain ``DataLoader`` batching, shuffling and loading ``dataset`` as ``loader`` does; refuses (naming the fix)
    a loader whose sampler or class carries more than that."""
    sampler = getattr(loader, "sampler", None)
    plain = (type(loader) is DataLoader and type(loader.batch_sampler) is BatchSampler
             and (type(sampler) is SequentialSampler
                  or (type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None)))
    if not plain:
        raise RuntimeError(f"{user} replaces the train split, but the train loader ({type(loader).__name__} with "
                           f"{type(sampler).__name__}) cannot be rebuilt around the replacement: keep the split in an "
                           "attribute of your LightningDataModule or LightningModule (e.g. self.train_set, set in "
                           "setup()) that train_dataloader() reads, or pass a plain DataLoader(dataset, batch_size=…, "
                           "shuffle=…)")
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=type(sampler) is RandomSampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                      pin_memory_device=loader.pin_memory_device)


class SplitRef:
    """A split of what the trainer's loop reads — the DataModule's or LightningModule's loader hook, or loaders given
    to ``fit`` —: the dataset, where it is held, and how to replace it where the loop will read the replacement."""

    def __init__(self, trainer: L.Trainer, stage: str, split: str | Callable | None, user: str):
        if stage not in LOADER_HOOKS:
            raise ValueError(f"stage {stage!r}: use one of {sorted(LOADER_HOOKS)}")
        self.stage, self.user, self.hook = stage, user, LOADER_HOOKS[stage]
        self.source = _loop_source(trainer, stage)
        self.holder = trainer.datamodule
        if self.holder is None and isinstance(self.source.instance, L.LightningModule) \
                and is_overridden(self.hook, self.source.instance):
            self.holder = self.source.instance
        self.loader = None
        if self.holder is None:
            self.dataset = self._given_loaders_dataset(split)
            self.attributes = []
        else:
            self.dataset = self._resolve(split)
            self.attributes = [name for name, value in vars(self.holder).items() if value is self.dataset]

    def _given_loaders_dataset(self, split) -> Dataset:
        verb = SETUP_STAGES[self.stage][0]
        if split is not None:
            raise ValueError(f"{self.user}: split={split!r} names an attribute of a DataModule or LightningModule, "
                             f"but the {self.stage} loader was passed to trainer.{verb}(...) directly: leave split "
                             "unset (the callback reads that loader's dataset)")
        self.loader = _first_loader(self.source.instance)
        if self.loader is None:
            raise RuntimeError(f"{self.user} needs the {self.stage} split, but the trainer has no {self.stage} loader "
                               f"it can read: pass a DataLoader or datamodule= to trainer.{verb}(...), or define "
                               f"{self.hook}() on the LightningModule")
        return self.loader.dataset

    def loader_dataset(self):
        """The dataset that the holder's loader hook returns now (None when it gives no loader yet)."""
        try:
            self.loader = _first_loader(getattr(self.holder, self.hook)())
        except Exception as error:  # noqa: BLE001 — typically setup() for this stage has not built the split yet
            self.hook_error = error
            return None
        return None if self.loader is None else self.loader.dataset

    def _resolve(self, split) -> Dataset:
        name, stages = type(self.holder).__name__, SETUP_STAGES[self.stage]
        self.hook_error = None
        if callable(split):
            dataset = split(self.holder)
        elif isinstance(split, str):
            for stage in stages:
                if getattr(self.holder, split, None) is None:
                    self.holder.setup(stage)
            dataset = getattr(self.holder, split, None)
            if dataset is None:
                raise AttributeError(f"{self.user}: {name} has no {self.stage} split in attribute {split!r} after "
                                     f"setup({', '.join(map(repr, stages))}): name the attribute that holds it "
                                     f"({self._candidates()})")
        else:
            dataset = self.loader_dataset()
            for stage in stages:  # a setup() split by stage may not have built this split in the current run
                if dataset is None:
                    self.holder.setup(stage)
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
        names = [k for k, v in vars(self.holder).items() if isinstance(v, Dataset)]
        return "dataset attributes: " + (", ".join(names) if names else "none")

    def _loader_to_rebuild(self) -> DataLoader:
        given = self.source.instance if self.holder is None else getattr(self.holder, self.hook)()
        if not isinstance(given, DataLoader):
            raise RuntimeError(f"{self.user} cannot replace the {self.stage} split: no attribute holds it and the "
                               f"loop's {self.stage} loaders are a {type(given).__name__}, not one DataLoader: keep "
                               "the split in an attribute of your LightningDataModule or LightningModule that "
                               f"{self.hook}() reads (e.g. self.train_set, set in setup())")
        return given

    def check_replaceable(self) -> None:
        """Before any work: the loader hook reads the attributes that will be replaced, or — no attribute holds the
        split — its loader can be rebuilt around the replacement."""
        if not self.attributes:
            rebuilt_loader(self._loader_to_rebuild(), self.dataset, self.user)
        elif self.loader_dataset() is not self.dataset:
            raise self._not_read(self.attributes)

    def replace(self, replacement: Dataset) -> list[tuple[object, str, object]]:
        """Install ``replacement`` where the loop reads the split; returns the (owner, attribute, original value)
        entries that :func:`undo_replacements` puts back."""
        if not self.attributes:
            undo = [(self.source, "instance", self.source.instance)]
            self.source.instance = rebuilt_loader(self._loader_to_rebuild(), replacement, self.user)
            return undo
        undo = [(self.holder, attribute, getattr(self.holder, attribute)) for attribute in self.attributes]
        for attribute in self.attributes:
            setattr(self.holder, attribute, replacement)
        if self.loader_dataset() is not replacement:
            undo_replacements(undo, replacement)
            raise self._not_read(self.attributes)
        return undo

    def _not_read(self, attributes: list[str]) -> RuntimeError:
        dataset, name = self.loader_dataset(), type(self.holder).__name__
        reads = next((k for k, v in vars(self.holder).items() if v is dataset and dataset is not None), None)
        fix = (f"pass split='{reads}' (the attribute the loader reads)" if reads else
               "make the loader read the split's attribute")
        return RuntimeError(f"{self.user} would replace {name}.{', '.join(attributes)}, but {name}.{self.hook}() "
                            f"reads {reads or 'another dataset'}: {fix}")


def undo_replacements(undo: list[tuple[object, str, object]], installed: Dataset) -> None:
    """Put back each attribute a defence replaced while it still holds ``installed`` or a later defence's replacement
    built on it (a loader over either), so that defences undone in any order leave the user's original objects."""
    for owner, attribute, original in reversed(undo):
        if _builds_on(getattr(owner, attribute), installed):
            setattr(owner, attribute, original)


def evaluated_split(trainer: L.Trainer, stage: str, split: str | Callable | None, user: str) -> Dataset:
    """The dataset the trainer's ``stage`` loop iterates now (``trainer.val_dataloaders`` / ``test_dataloaders``),
    else the DataModule's split found as :class:`SplitRef` does."""
    if split is None:
        loader = _first_loader({"val": trainer.val_dataloaders, "test": trainer.test_dataloaders}.get(stage))
        if loader is not None:
            return loader.dataset
    return SplitRef(trainer, stage, split, user).dataset


def _builds_on(dataset, installed: Dataset, depth: int = 8) -> bool:
    """Whether ``dataset`` is ``installed`` or wraps it (``Subset.dataset``, ``ReplacedImages.base``, a loader's
    ``dataset``), as when a later defence replaces the split an earlier one installed."""
    for _ in range(depth):
        if dataset is installed:
            return True
        wrapped = getattr(dataset, "base", None)
        dataset = wrapped if wrapped is not None else getattr(dataset, "dataset", None)
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


def shard_map(trainer: L.Trainer, data: Dataset | torch.Tensor, batch_size: int,
              compute: Callable[..., dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]],
              item_format: ItemFormat | None = None) -> dict[str, torch.Tensor]:
    """The one shard → compute → gather loop: ``compute(rows, images, targets)`` on this rank's batches
    (:func:`rank_batches`) of ``data`` — a dataset (images in the loader's space, read with ``item_format``) or a
    tensor of images (``targets`` None) —, every output gathered in single-process order (:func:`gather_in_order`),
    the same on every rank.

    ``compute`` returns ``{name: tensor}`` with one row per item of ``rows``, or ``{name: (tensor, its_rows)}`` for
    an output of some items of the batch only. The empty-rank rule: whatever a rank did not compute (no batch, or an
    output none of its batches gave) it contributes as zero rows shaped as the ranks that did compute it — so no
    rank runs work only to learn shapes, and every rank joins every gather."""
    if not isinstance(data, torch.Tensor) and item_format is None:
        raise ValueError("shard_map reads dataset items: pass item_format=")
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for rows in rank_batches(len(data), batch_size, trainer):
        if isinstance(data, torch.Tensor):
            images, targets = data[rows], None
        else:
            images, targets = item_format.collate([data[i] for i in rows.tolist()])
        for name, value in compute(rows, images, targets).items():
            value, value_rows = value if isinstance(value, tuple) else (value, rows)
            parts.setdefault(name, []).append((value, value_rows.to(value.device)))
    shapes = _output_shapes(parts, trainer)
    gathered = {}
    for name, (trailing, dtype) in shapes.items():
        if name in parts:
            values, rows = (torch.cat(column) for column in zip(*parts[name]))
        else:  # only under DDP: another rank computed it
            device = trainer.strategy.root_device
            values = torch.zeros(0, *trailing, dtype=dtype, device=device)
            rows = torch.zeros(0, dtype=torch.long, device=device)
        gathered[name] = gather_in_order(values, rows, trainer)
    return gathered


def _output_shapes(parts: dict, trainer: L.Trainer) -> dict[str, tuple[tuple, torch.dtype]]:
    """Each output's trailing shape and dtype, the union over ranks (one object gather; none on one process)."""
    local = {name: (tuple(pieces[0][0].shape[1:]), pieces[0][0].dtype) for name, pieces in parts.items()}
    if trainer.world_size == 1:
        return local
    every: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(every, local)
    return {name: shape for shapes in every for name, shape in shapes.items()}


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


# ---- the bases ------------------------------------------------------------------------------------------------------
class ContractCallback(L.Callback):
    """Base of every callback that reads a split: it owns the item format, the pixel space, the split setting, the
    output folder, the shape check and the state key, so that each works the same in any Lightning project.

    Args:
        split: the DataModule (or LightningModule) attribute holding the split (e.g. ``"mnist_test"``) or a callable
            returning it; default: the dataset the trainer's loader iterates.
        item_keys: ``(image_key, target_key)`` of dict items (default: common names; tuples use positions 0 and 1).
        normalization: ``(mean, std)`` of the loader's ``Normalize``, or ``(to_unit, from_unit)`` callables; the
            callback works in [0, 1] and hands the model images in the loader's space.
        output_dir: where files go (default: :func:`output_folder`, ``/<folder_name>`` below it).
    """

    folder_name = ""  # the subfolder of the trainer's output folder when output_dir is not given

    def __init__(self, split: str | Callable | None = None, item_keys: tuple | None = None, normalization=None,
                 output_dir: str | Path | None = None):
        self.split, self.normalization, self.output_dir = split, normalization, output_dir
        self.item_format = ItemFormat(item_keys)
        self.pixel_space = PixelSpace(normalization, type(self).__name__)

    def outputs(self, trainer: L.Trainer) -> Path:
        """``output_dir``, else ``<the trainer's output folder>/<folder_name>`` (:func:`output_folder`)."""
        return Path(self.output_dir) if self.output_dir else output_folder(trainer, None) / self.folder_name

    def check_shape(self, images: torch.Tensor, model, model_name: str = "model") -> None:
        """Images against the model's ``in_chans`` / ``img_size`` (:func:`check_image_shape`), before any work."""
        check_image_shape(images, model, type(self).__name__, model_name)

    def state_key_fields(self) -> dict:
        """The settings that tell two instances of this callback in one trainer apart (none: one instance)."""
        return {}

    @property
    @override
    def state_key(self) -> str:
        fields = self.state_key_fields()
        return self._generate_state_key(**fields) if fields else super().state_key


# ---- the base of the callbacks that replace the train split ---------------------------------------------------------
class TrainSplitDefence(ContractCallback):
    """Base of purification and data filters: read the split the train loader iterates at ``on_fit_start`` (after a
    resumed fit restored this callback's state, before any train loader exists) — un-augmented where the split is
    randomly augmented (:mod:`lit_robust.callbacks.augmentation`) —, install the replacement, prove at
    ``on_train_start`` that the trainer iterates it, log the defence's numbers once per training epoch, and put the
    user's objects back at the end of fit, on an exception and at teardown. ``split``, ``item_keys``,
    ``normalization``, ``output_dir``: :class:`ContractCallback` (the split: the train loader's by default).
    """

    refuses_unseparable_augmentation = False  # a filter may decide on one augmented draw; a purification may not

    def __init__(self, split: str | Callable | None = None, item_keys: tuple | None = None, normalization=None,
                 output_dir: str | None = None):
        super().__init__(split, item_keys, normalization, output_dir)
        self.installed: Dataset | None = None
        self.replaced: list[tuple[object, str, object]] = []
        self.augmentation: SeparatedAugmentation | None = None
        self.stats: dict[str, float] = {}

    def train_split(self, trainer: L.Trainer) -> SplitRef:
        """The train split the loader reads, checked to be replaceable before any work."""
        ref = SplitRef(trainer, "train", self.split, type(self).__name__)
        ref.check_replaceable()
        return ref

    @property
    def split_space(self) -> PixelSpace:
        """The pixel space of the images read: [0, 1] where the loader's ``Normalize`` runs after the separated
        augmentation, else the loader's."""
        if self.augmentation is not None and self.augmentation.normalizes_after:
            return PixelSpace(None, type(self).__name__)
        return self.pixel_space

    def unit_images(self, ref: SplitRef) -> tuple[torch.Tensor, torch.Tensor]:
        """All (un-augmented) images of the split in [0, 1] and its targets."""
        user = type(self).__name__
        try:
            self.augmentation = separate_augmentation(ref.dataset, self.item_format.image, user)
        except ValueError as refusal:
            if self.refuses_unseparable_augmentation:
                raise
            self.augmentation = None
            rank_zero_warn(f"{refusal} — {user} decides on one augmented draw of each image")
        with self.augmentation.unaugmented() if self.augmentation is not None else nullcontext():
            images, targets = self.item_format.stack(ref.dataset)
        return self.split_space.to_unit(images), targets

    def install(self, ref: SplitRef, replacement: Dataset) -> None:
        self.replaced = ref.replace(replacement)
        self.installed = replacement

    def restore(self) -> None:
        """Put back what :meth:`install` replaced (a later defence's replacement built on it included)."""
        if self.installed is not None:
            undo_replacements(self.replaced, self.installed)
        self.replaced = []

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.installed is not None:
            check_train_loader_reads(trainer, self.installed, type(self).__name__)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stats:  # the same on every rank (computed from gathered results)
            pl_module.log_dict(self.stats, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()


class SplitEvaluation(ContractCallback):
    """A callback that evaluates the val and/or test split at the end of that loop's epoch (not during the sanity
    check): subclasses implement :meth:`evaluate`, which returns the flat metrics it logged. ``splits``: ``val``
    and/or ``test``; the rest: :class:`ContractCallback`."""

    def __init__(self, splits: Sequence[str], split: str | Callable | None = None, item_keys: tuple | None = None,
                 normalization=None, output_dir: str | Path | None = None):
        super().__init__(split, item_keys, normalization, output_dir)
        bad = set(splits) - {"val", "test"}
        if bad:
            raise ValueError(f"{type(self).__name__} splits {sorted(bad)}: use 'val' and/or 'test'")
        self.splits = list(splits)

    def evaluated(self, trainer: L.Trainer, stage: str) -> Dataset:
        """The split of ``stage`` this callback evaluates (:func:`evaluated_split`)."""
        return evaluated_split(trainer, stage, self.split, type(self).__name__)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> dict[str, float]:
        raise NotImplementedError

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "val" in self.splits and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test" in self.splits:
            self.evaluate(trainer, pl_module, "test")


class RankZeroReport(ContractCallback):
    """Base of the reports that run whole on global rank zero at the end of testing (they train baselines or
    regressors in a nested trainer, fine-tune and attack, so they need gradients): :meth:`run_report` returns the
    flat metrics, which are broadcast so every rank logs them through ``log_dict`` (every logger, and
    ``metrics.json`` through :class:`~lit_robust.callbacks.MetricsFile`). The methods the report calls on the module
    (:meth:`required_methods`) are checked at setup, before training or testing."""

    def required_methods(self) -> dict[str, str]:
        """``{method: its signature and use}`` that the LightningModule under test must define."""
        return {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        missing = [f"{name}{use}" for name, use in self.required_methods().items()
                   if not callable(getattr(pl_module, name, None))]
        if missing:
            raise TypeError(f"{type(self).__name__} calls methods that {type(pl_module).__name__} does not define: "
                            f"{'; '.join(missing)}: add them to your LightningModule or leave this callback out")

    def run_report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        raise NotImplementedError

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = None
        if trainer.is_global_zero:
            was_training = pl_module.training
            pl_module.eval()
            with torch.inference_mode(False), torch.enable_grad():
                metrics = self.run_report(trainer, pl_module)
            pl_module.train(was_training)
        pl_module.log_dict(trainer.strategy.broadcast(metrics, 0), sync_dist=False)
