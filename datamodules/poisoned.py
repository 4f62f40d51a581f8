"""``PoisonedDataModule``: any ``ImageDataModule`` with a poisoning attack applied to its training split.

The attacks themselves are pure functions in ``lit_robust.poisons``; this module crafts them once per
(attack, parameters, seed, clean data), caches the result atomically with a sha256 checksum (a corrupt cache is
detected and rebuilt), writes a JSON manifest beside it, and serves the poisoned train split plus the test-time
views the poison metrics need.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lit_robust.datamodules.base import ImageDataModule
from lit_robust.datamodules.wrapper import WrappedDataModule
from lit_robust.datasets import TensorImageDataset, stack_dataset
from lit_robust.poisons import ATTACKS, CraftingData, Poisons, apply_trigger, attack_defaults
from lit_robust.storage.cache import check_writable, fingerprint, load_verified, save_atomic
from lit_robust.storage.json_files import write_json_atomic
from lit_robust.storage.run_paths import expand_path


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def non_finite_params(params, prefix: str = "data.params") -> list[str]:
    """The ``key=value`` of every NaN or infinite number in ``params`` (nested lists and dicts included)."""
    if isinstance(params, dict):
        return [bad for k, v in params.items() for bad in non_finite_params(v, f"{prefix}.{k}")]
    if isinstance(params, (list, tuple)):
        return [bad for i, v in enumerate(params) for bad in non_finite_params(v, f"{prefix}[{i}]")]
    if isinstance(params, torch.Tensor):
        return [] if torch.isfinite(params).all() else [f"{prefix}=tensor with NaN/inf"]
    if isinstance(params, float) and not math.isfinite(params):
        return [f"{prefix}={params}"]
    return []


def check_crafted(poisons: Poisons, attack: str, params: dict) -> None:
    """Refuse poisons with NaN or infinite pixels (images, trigger) before they are cached: a diverged crafting (too
    large a step ``lr``, an ``eps`` or trigger ``value`` that is not a number) would otherwise be served to every
    later run from the cache."""
    tensors = {"images": poisons.images, **{f"trigger {k}": v for k, v in (poisons.trigger or {}).items()
                                            if isinstance(v, torch.Tensor) and v.is_floating_point()}}
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        steps = {k: params[k] for k in ("lr", "eps", "steps", "value") if k in params}
        raise FloatingPointError(f"attack {attack!r} crafted NaN or infinite {' and '.join(bad)} with data.params "
                                 f"{steps}: lower data.params.lr or check data.params.eps / value; nothing was cached")


def _describes(manifest_path: Path, manifest: dict) -> bool:
    """Whether the JSON at ``manifest_path`` is the manifest of these poisons (False if missing, corrupt or stale)."""
    try:
        return json.loads(manifest_path.read_text()).get("checksum") == manifest["checksum"]
    except (OSError, ValueError, AttributeError):
        return False


class PoisonedDataModule(WrappedDataModule):
    """Wrap ``base`` (never edited) and poison its training split with ``attack`` (``badnets``, ``narcissus``,
    ``gradient_matching``, ``bullseye_polytope``, ``planted``; see ``lit_robust.poisons``).

    After ``setup()``:
      - ``train_dataset``: a replaceable ``TensorImageDataset`` of (image, label), the base's train split with the
        poisoned indices replaced (purification/filtering callbacks may swap it before the train loader is built);
        ``val_dataset``/``test_dataset`` are the base's clean splits (natural accuracy);
      - ``manifest``: dict with attack, params (every default resolved), seed, poisoned_indices, num_poisons,
        target_class, source_class, target_index, trigger description, cache path and its sha256 ``checksum``; also
        written as ``<cache>.json`` beside the cached poisons;
      - ``poisons``: the ``Poisons`` record; ``poison_mask``: bool (N_train,) marking poisoned training items;
      - ``triggered_test_dataset(multiplier=1.0)`` (triggered attacks): the test images the attack is meant to flip
        (all non-target classes; only the source class for BadNets) with the trigger applied ×multiplier and their
        *true* labels — attack success = fraction predicted as ``target_class`` (Eq. D.5);
      - ``target_dataset()`` (targeted attacks GM/BP): the target test image with its *adversarial* label — success
        = it is predicted as that label (Eq. D.4);
      - ``eval_dataloader(dataset)``: a DDP-safe evaluation loader over any of these.

    Args:
        base: the clean DataModule (its ``num_classes``/``in_chans``/loader settings are forwarded).
        attack: the attack name; ``params``: overrides of its defaults (unknown keys are an error).
        seed: crafting seed (default: the base's seed). ``cache_dir``: where poisons and manifests live.
        device: where crafting runs: ``auto`` (CUDA when available), ``cpu``, ``cuda``; training is the Trainer's.
    """

    def __init__(self, base: ImageDataModule, attack: str = "badnets", params: dict | None = None,
                 seed: int | None = None, cache_dir: str = "data/poisons", progress: bool = True,
                 device: str = "auto"):
        super().__init__(base, seed)
        defaults = attack_defaults(attack)
        unknown = set(params or {}) - set(defaults)
        if unknown:
            raise ValueError(f"data.params has {sorted(unknown)}, which attack {attack!r} does not take; "
                             f"its parameters are {sorted(defaults)}")
        self.attack, self.progress, self.device = attack, progress, device
        self.params = {**defaults, **(params or {})}
        bad = non_finite_params(self.params)
        if bad:
            raise ValueError(f"{', '.join(bad)} is not a finite number: attack {attack!r} would craft NaN poisons; "
                             f"set it to a number (default: {defaults})")
        self.cache_dir = Path(expand_path(str(cache_dir), "data.cache_dir"))
        self.poisons: Poisons | None = None
        self.manifest: dict | None = None
        self.poison_mask: torch.Tensor | None = None

    def cache_path(self, train_images: torch.Tensor, train_labels: torch.Tensor, test_labels: torch.Tensor) -> Path:
        key = fingerprint(self.attack, _jsonable(self.params), self.seed, type(self.base).__name__,
                          train_images, train_labels, test_labels)
        return self.cache_dir / f"{self.attack}-{key}.pt"

    def crafting_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def craft(self, data: CraftingData) -> Poisons:
        """Run the attack on ``crafting_device()`` (data, models and the seeded generator all live there, through
        ``torch.device`` as the default-device context) and bring the result back to the CPU; the global RNG is left
        as it was. The same seed gives the same poisons on the same device type."""
        device = self.crafting_device()
        generator = torch.Generator(device=device).manual_seed(int(self.seed))
        data = CraftingData(*(t.to(device) for t in (data.train_images, data.train_labels, data.test_images,
                                                      data.test_labels)), data.num_classes)
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else None), device:
            torch.manual_seed(int(self.seed))
            poisons = ATTACKS[self.attack](data, generator=generator, progress=self.progress, **self.params)
        return poisons.to("cpu")

    def _load_or_craft(self, path: Path, data: CraftingData) -> tuple[Poisons, bool]:
        """Rank zero loads or crafts and saves; other ranks wait at a barrier, then load the verified cache."""
        trainer = self.trainer
        distributed = trainer is not None and trainer.world_size > 1
        if distributed and trainer.global_rank != 0:
            trainer.strategy.barrier()
            payload = load_verified(path, kind=dict)
            if payload is None:
                raise RuntimeError(f"rank {trainer.global_rank} found no valid poison cache at {path}; is cache_dir "
                                   "on a filesystem every rank can read?")
            return Poisons.from_payload(payload), False
        payload = load_verified(path, kind=dict)
        crafted = payload is None
        if crafted:
            check_writable(self.cache_dir, "data.cache_dir")
            poisons = self.craft(data)
            check_crafted(poisons, self.attack, self.params)
            save_atomic(path, poisons.to_payload())
        else:
            poisons = Poisons.from_payload(payload)
        if distributed:
            trainer.strategy.barrier()
        return poisons, crafted

    def setup(self, stage: str | None = None) -> None:
        if self.poisons is not None:
            return
        self.base.setup(stage)
        train_images, train_labels = stack_dataset(self.base.train_dataset)
        test_images, test_labels = stack_dataset(self.base.test_dataset)
        data = CraftingData(train_images, train_labels, test_images, test_labels, self.num_classes)
        path = self.cache_path(train_images, train_labels, test_labels)
        self.poisons, crafted = self._load_or_craft(path, data)
        self._test = (test_images, test_labels)
        images, labels = train_images.clone(), train_labels.clone()
        images[self.poisons.indices] = self.poisons.images.to(images.dtype)
        labels[self.poisons.indices] = self.poisons.labels.to(labels.dtype)
        self.poison_mask = torch.zeros(len(labels), dtype=torch.bool)
        self.poison_mask[self.poisons.indices] = True
        self.train_dataset = TensorImageDataset(images, labels)
        self.val_dataset, self.test_dataset = self.base.val_dataset, self.base.test_dataset
        self.manifest = self._manifest(path)
        if crafted or not _describes(path.with_suffix(".json"), self.manifest):
            if self.trainer is None or self.trainer.is_global_zero:
                write_json_atomic(path.with_suffix(".json"), self.manifest)

    def _manifest(self, path: Path) -> dict:
        p = self.poisons
        trigger = None
        if p.trigger is not None:
            trigger = {k: _jsonable(v) for k, v in p.trigger.items()}
            if "delta" in p.trigger:
                trigger["linf"] = float(p.trigger["delta"].abs().max())
        return {"attack": self.attack, "params": _jsonable(self.params), "seed": int(self.seed),
                "base": type(self.base).__name__, "num_train": int(len(self.poison_mask)),
                "num_poisons": int(len(p.indices)), "poisoned_indices": p.indices.tolist(),
                "target_class": None if p.target_class is None else int(p.target_class),
                "source_class": p.source_class,
                "target_index": p.target_index, "trigger": trigger, "info": _jsonable(p.info),
                "cache": str(path), "checksum": path.with_name(path.name + ".sha256").read_text().strip()}

    def _require(self, what: str) -> Poisons:
        if self.poisons is None:
            raise RuntimeError(f"PoisonedDataModule.{what}: call setup() first")
        return self.poisons

    def triggered_test_dataset(self, multiplier: float = 1.0) -> TensorImageDataset:
        """Test images the trigger should flip (non-target classes; the source class only for BadNets; all of them
        for a trigger of no class), trigger applied ×``multiplier``, labelled with their true class."""
        p = self._require("triggered_test_dataset")
        if p.trigger is None:
            raise ValueError(f"attack {self.attack!r} has no trigger; use target_dataset() for targeted attacks")
        images, labels = self._test
        keep = torch.ones_like(labels, dtype=torch.bool) if p.target_class is None else labels != p.target_class
        if p.source_class is not None:
            keep &= labels == p.source_class
        return TensorImageDataset(apply_trigger(images[keep], p.trigger, multiplier), labels[keep])

    def target_dataset(self) -> TensorImageDataset:
        """The targeted attack's test image(s) labelled with the adversarial class."""
        p = self._require("target_dataset")
        if p.target_index is None:
            raise ValueError(f"attack {self.attack!r} has no target image; use triggered_test_dataset()")
        images, _ = self._test
        index = torch.as_tensor([p.target_index])
        return TensorImageDataset(images[index], torch.full((1,), p.target_class, dtype=torch.long))
