"""Purification callbacks: replace the train split the loader reads by its purified version before fitting.

Thesis 000 ch. 6 (PureEBM, Algorithm 1: mid-run Langevin from each training image), ch. 7 (PureGen-DDPM: diffuse to
step t, reverse chain to 0) and §7.5 (PureGen-NAIVE / -REPS / -FILT). Work with any Lightning ``Trainer`` and any
DataModule (the split, item format and pixel space follow :mod:`lit_robust.callbacks.contract`):

    trainer = L.Trainer(callbacks=[EBMPurification(EBM.pretrained("digits"), steps=150,
                                                   normalization=((0.1307,), (0.3081,)))])
    trainer.fit(classifier, datamodule=your_mnist_datamodule)

:class:`Purification` does everything but the purification itself: it cuts the train set into fixed-size chunks,
shares the chunks out over DDP ranks, seeds each chunk's noise from (seed, chunk index) — never from the rank — so 2
processes produce bit-for-bit the set 1 process does, checks every finished chunk (finite, not saturated) and caches
it (atomic write + sha256, keyed by the weights the purification uses, the data and the parameters) so an interrupted
run keeps its finished chunks and a repeated run recomputes nothing, gathers the chunks in the original order and
installs the purified split. A randomly augmented split is purified before its random transforms, which still run
on every read of the purified images (:mod:`lit_robust.callbacks.augmentation`). Subclasses override
:meth:`Purification.purify_chunk` only.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lit_robust.callbacks.contract import (ReplacedImages, TrainSplitDefence, check_image_shape, output_folder,
                                           rank_share, shard_map)
from lit_robust.datasets import stack_dataset
from lit_robust.figures import save_before_after_grid, save_trajectory_plot, trajectory_distances
from lit_robust.storage.cache import check_writable, fingerprint, load_verified, save_atomic
from lit_robust.storage.run_paths import expand_path


def chunk_seed(seed: int, chunk: int) -> int:
    """The noise seed of one chunk: a function of the run's seed and the chunk's position only."""
    return int(fingerprint("purification-chunk", seed, chunk), 16) % (2 ** 63)


def check_purified(before: torch.Tensor, after: torch.Tensor, max_saturated: float, user: str) -> None:
    """Refuse a purified chunk that is not finite, or in which more than ``max_saturated`` of the pixels strictly
    inside (0, 1) before were driven to 0 or 1 (the sign of a step size or temperature that destroys the images)."""
    if not torch.isfinite(after).all():
        raise FloatingPointError(f"{user} produced NaN or infinite pixels: lower step_size / raise temperature (or "
                                 "check that step_size is a finite number); nothing was cached")
    inside = (before > 0) & (before < 1)
    if inside.any():
        saturated = ((after <= 0) | (after >= 1))[inside].float().mean().item()
        if saturated > max_saturated:
            raise ValueError(f"{user} drove {100 * saturated:.1f} % of the non-saturated pixels to 0 or 1 (bound "
                             f"max_saturated={max_saturated}): the purification destroys the images — lower "
                             "step_size, raise temperature or use fewer steps; nothing was cached")


def purification_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a model's purification depends on: its parameters and buffers, less an EBM's replay ``bank`` (the
    persistent chains of its training, drawn at random when the EBM is built and never read by Langevin
    purification)."""
    from lit_robust.models.ebm import EBM

    state = model.state_dict()
    return {k: v for k, v in state.items() if not (isinstance(model, EBM) and k == "bank")}


class Purification(TrainSplitDefence):
    """Base class: shard, check, cache, gather and install the purified train split (see the module docstring).

    Args:
        cache_dir: folder of the chunk cache (default ``<output folder>/purified``); point several runs at one folder
            to share purified sets between them.
        chunk_size: images per chunk = per forward batch and per cache file. Part of the cache key and of the noise
            seeding: keep it fixed to reproduce a set.
        seed: noise seed of the purification (independent of the trainer's seed).
        max_saturated: the largest share of the pixels inside (0, 1) that a chunk may drive to 0 or 1 before it is
            refused (the shipped EBM on the digits drives ≈ 0.68, at most 0.80 of an image, back to the background
            or stroke; a step size or temperature that destroys the images drives ≥ 0.99).
        progress: show a progress bar on rank zero.
        channels_last: run the models and chunks in the ``channels_last`` memory format (a CPU and GPU speed-up for
            convolution stacks such as the EBM; output equal to ≈ 1e-7, and part of the cache key). Off in the base
            and for the diffusers U-Net, where it measured no faster on CPU (docs/results.md).
        plots: on rank zero, save ``plots/<name>_before_after.png`` (poisoned images first, if the DataModule marks
            them with ``poison_mask``) in the output folder.
        split, item_keys, normalization, output_dir: the shared contract (:class:`TrainSplitDefence`).

    Logged once per training epoch: ``purify/seconds``, ``purify/chunks_computed_rank0``, ``purify/mean_l2_change``
    (in [0, 1] pixel space).
    """

    refuses_unseparable_augmentation = True  # purifying one augmented draw would freeze the augmentation

    def __init__(self, cache_dir: str | None = None, chunk_size: int = 250, seed: int = 0,
                 max_saturated: float = 0.9, progress: bool = True, plots: bool = True, channels_last: bool = False,
                 **contract):
        super().__init__(**contract)
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
        self.cache_dir, self.chunk_size, self.seed, self.progress = cache_dir, chunk_size, seed, progress
        self.max_saturated, self.plots, self.channels_last = max_saturated, plots, channels_last
        self.key: str | None = None
        self.completed = False

    # ---- what subclasses provide -----------------------------------------------------------------------------------
    def models(self) -> dict[str, nn.Module]:
        """The generative models used (hashed into the cache key, moved to the trainer's device)."""
        return {}

    def settings(self) -> dict:
        """The purification's parameters (part of the cache key and of ``state_key``)."""
        return {}

    def prepare(self, images: torch.Tensor, device: torch.device) -> None:
        """Optional whole-dataset pass before chunking (PureGen-FILT ranks all images by energy here)."""

    def purify_chunk(self, images: torch.Tensor, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Purify one chunk of [0, 1] images (on the device) using only ``generator`` for randomness."""
        raise NotImplementedError

    # ---- Lightning hooks -----------------------------------------------------------------------------------------
    @override
    def state_key_fields(self) -> dict:
        return self.settings()

    def state_dict(self) -> dict:
        return {"key": self.key, "completed": self.completed, "stats": dict(self.stats)}

    def load_state_dict(self, state_dict: dict) -> None:
        # A resumed fit finds its chunks again through the cache key; keep the record for inspection.
        self.key, self.completed = state_dict.get("key"), state_dict.get("completed", False)
        self.stats = dict(state_dict.get("stats", {}))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ref = self.train_split(trainer)
        images, _ = self.unit_images(ref)  # un-augmented: the random transforms run on each read of the result
        for name, model in self.models().items():
            check_image_shape(images, model, type(self).__name__, name)
        purified = self.purify_dataset(images, trainer, pl_module.device)
        augment = self.augmentation.augment if self.augmentation is not None else None
        self.install(ref, ReplacedImages(ref.dataset, self.split_space.from_unit(purified), self.item_format, augment))
        if self.plots and trainer.is_global_zero:
            self.report(output_folder(trainer, self.output_dir), trainer.datamodule, images, purified,
                        pl_module.device)

    def report(self, folder: Path, datamodule, images: torch.Tensor, purified: torch.Tensor,
               device: torch.device) -> None:
        """Rank zero only (no collectives here): the before/after grid."""
        mask = getattr(datamodule, "poison_mask", None)
        order = torch.cat([mask.nonzero().flatten(), (~mask).nonzero().flatten()]) \
            if mask is not None and len(mask) == len(images) else torch.arange(len(images))
        shown, name = order[:10], type(self).__name__
        save_before_after_grid(images[shown], purified[shown], folder / "plots" / f"{name}_before_after.png")

    # ---- the work --------------------------------------------------------------------------------------------------
    def cache_key(self, images: torch.Tensor) -> str:
        """Everything that determines the purified set: the models' purification weights, the settings, the chunking,
        the seed and the (un-augmented) images."""
        weights = {name: fingerprint(purification_weights(m)) for name, m in self.models().items()}
        return fingerprint(type(self).__name__, weights, self.settings(), self.chunk_size, self.seed,
                           {"channels_last": self.channels_last}, images.float())

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def purify_dataset(self, images: torch.Tensor, trainer: L.Trainer, device: torch.device) -> torch.Tensor:
        """All images purified, identical on every rank; each rank computes (or loads) only its own chunks."""
        started = time.perf_counter()
        self.key = self.cache_key(images)
        root = Path(expand_path(str(self.cache_dir), "cache_dir")) if self.cache_dir else \
            output_folder(trainer, self.output_dir) / "purified"
        folder = check_writable(root / self.key, "cache_dir")  # before the first chunk, not after it
        for model in self.models().values():
            model.to(device, memory_format=self.memory_format).eval()
        self.prepare(images, device)
        computed = 0
        bar = self._progress_bar(len(rank_share(math.ceil(len(images) / self.chunk_size), trainer)),
                                 trainer.is_global_zero)

        def purify_or_load(rows: torch.Tensor, originals: torch.Tensor, _) -> dict[str, torch.Tensor]:
            nonlocal computed
            chunk = int(rows[0]) // self.chunk_size
            path = folder / f"chunk_{chunk:05d}.pt"
            cached = load_verified(path, shape=tuple(originals.shape), dtype=torch.float32, value_range=(0.0, 1.0))
            if cached is None:
                generator = torch.Generator(device=device).manual_seed(chunk_seed(self.seed, chunk))
                chunk_images = originals.to(device).contiguous(memory_format=self.memory_format)
                cached = self.purify_chunk(chunk_images, rows, generator).detach().float().cpu().contiguous()
                check_purified(originals, cached, self.max_saturated, type(self).__name__)
                save_atomic(path, cached)
                computed += 1
            if bar is not None:
                bar.update(1)
            return {"purified": cached}

        purified = shard_map(trainer, images, self.chunk_size, purify_or_load)["purified"].cpu()
        if bar is not None:
            bar.close()
        self.completed = True
        self.stats = {"purify/seconds": time.perf_counter() - started, "purify/chunks_computed_rank0": float(computed),
                      "purify/mean_l2_change": (purified - images).flatten(1).norm(dim=1).mean().item()}
        return purified

    def _progress_bar(self, total: int, is_global_zero: bool):
        if not (self.progress and is_global_zero and total):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{type(self).__name__} (rank 0 chunks)", unit="chunk")


def _as_ebm(ebm):
    from lit_robust.models.ebm import load_ebm

    return load_ebm(ebm) if isinstance(ebm, str) else ebm


def _as_ddpm(ddpm):
    from lit_robust.models.ddpm import load_ddpm

    return load_ddpm(ddpm) if isinstance(ddpm, str) else ddpm


class EBMPurification(Purification):
    """PureEBM (PureGen-EBM): ``steps`` mid-run Langevin steps (Eq. 6.7) from each training image (Algorithm 1).

    ``ebm`` is an :class:`~lit_robust.EBM` or a source string for :func:`lit_robust.models.ebm.load_ebm`
    (``pretrained:digits``, an exported ``.pt``, a ``.ckpt``). ``step_size``/``temperature`` default to the EBM's.
    """

    def __init__(self, ebm, steps: int = 150, step_size: float | None = None, temperature: float | None = None,
                 bf16: bool = False, trajectory_images: int = 32, channels_last: bool = True, **kwargs):
        super().__init__(channels_last=channels_last, **kwargs)
        self.ebm, self.steps, self.bf16 = _as_ebm(ebm), steps, bf16
        self.trajectory_images = trajectory_images
        self.step_size = step_size if step_size is not None else self.ebm.hparams.step_size
        self.temperature = temperature if temperature is not None else self.ebm.hparams.temperature

    def models(self):
        return {"ebm": self.ebm}

    def settings(self):
        return {"steps": self.steps, "step_size": self.step_size, "temperature": self.temperature, "bf16": self.bf16}

    def purify_chunk(self, images, indices, generator):
        return self.ebm.purify(images, self.steps, self.step_size, self.temperature, generator, bf16=self.bf16)[0]

    def report(self, folder, datamodule, images, purified, device):
        """Also the thesis' Fig. 6.2 when the DataModule knows the clean originals of its poisons (``base`` +
        ``poison_mask``, as ``PoisonedDataModule``): ℓ2 distances along chains of 2 × ``steps`` from
        ``trajectory_images`` clean and poisoned images, logged as ``purify/fig62_*``. Rank zero only."""
        super().report(folder, datamodule, images, purified, device)
        mask, base = getattr(datamodule, "poison_mask", None), getattr(datamodule, "base", None)
        if not self.trajectory_images or mask is None or not mask.any() or base is None:
            return
        chosen = mask.nonzero().flatten()[: self.trajectory_images]
        clean = stack_dataset(base.train_dataset)[0][chosen]
        every = max(1, self.steps // 15)
        generator = torch.Generator(device=device).manual_seed(chunk_seed(self.seed, -1))
        chains = [self.ebm.purify(start.to(device), 2 * self.steps, self.step_size, self.temperature, generator,
                                  record_every=every)[1] for start in (clean, images[chosen])]
        distances = trajectory_distances(clean.to(device), images[chosen].to(device), *chains)
        steps = list(range(0, 2 * self.steps + 1, every))[: len(chains[0])]
        save_trajectory_plot(steps, distances, folder / "plots" / "EBMPurification_l2_trajectory.png", self.steps)
        at = steps.index(min(steps, key=lambda s: abs(s - self.steps)))
        self.stats.update({f"purify/fig62_{k}_at_{steps[at]}": float(v[at]) for k, v in distances.items()})


class JPEGPurification(Purification):
    """The JPEG-compression baseline of PureGen's tables (thesis Table 7.2, after Liu et al. 2023): each training image
    is encoded at ``quality`` (1–100) and decoded again with torchvision's batched ``encode_jpeg`` / ``decode_jpeg``.
    The thesis reports JPEG-25/50/75/85 and picks, per attack, the strongest setting that keeps natural accuracy;
    75 is the setting of most of its rows. No generative model and no randomness: the cache key is the quality and
    the images. The codec's arithmetic is integer, so the result is the same on every device and batch layout."""

    def __init__(self, quality: int = 75, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= quality <= 100:
            raise ValueError(f"quality={quality}: JPEG quality is an integer in [1, 100] (the thesis uses 25-85)")
        self.quality = int(quality)

    def settings(self):
        return {"quality": self.quality}

    def purify_chunk(self, images, indices, generator):
        from torchvision.io import decode_jpeg, encode_jpeg

        pixels = list(images.mul(255).round().to(torch.uint8).cpu())  # the codec runs on the CPU
        decoded = decode_jpeg(encode_jpeg(pixels, quality=self.quality))
        return torch.stack(decoded).to(images.device, torch.float32).div(255)


class DDPMPurification(Purification):
    """PureGen-DDPM: diffuse each image to ``forward_steps`` (75 in the thesis), then run the reverse chain to 0."""

    def __init__(self, ddpm, forward_steps: int = 75, **kwargs):
        super().__init__(**kwargs)
        self.ddpm, self.forward_steps = ddpm, forward_steps  # a checkpoint path is loaded when the fit starts

    def models(self):
        self.ddpm = _as_ddpm(self.ddpm)
        return {"ddpm": self.ddpm}

    def settings(self):
        return {"forward_steps": self.forward_steps}

    def purify_chunk(self, images, indices, generator):
        return self.ddpm.purify(images, self.forward_steps, generator)


class PureGenNaive(Purification):
    """PureGen-NAIVE (§7.5): ``ebm_steps`` EBM Langevin steps, then DDPM diffuse-and-denoise from ``ddpm_steps``;
    REPS repeats the pair ``reps`` times (T = [150, 75, 1] for NAIVE in Table E, [10, 50, 5] for REPS)."""

    def __init__(self, ebm, ddpm, ebm_steps: int = 150, ddpm_steps: int = 75, reps: int = 1, **kwargs):
        super().__init__(**kwargs)
        if reps < 1:
            raise ValueError(f"reps={reps}: must be >= 1")
        self.ebm, self.ddpm = _as_ebm(ebm), _as_ddpm(ddpm)
        self.ebm_steps, self.ddpm_steps, self.reps = ebm_steps, ddpm_steps, reps

    def models(self):
        return {"ebm": self.ebm, "ddpm": self.ddpm}

    def settings(self):
        return {"ebm_steps": self.ebm_steps, "ddpm_steps": self.ddpm_steps, "reps": self.reps}

    def purify_chunk(self, images, indices, generator):
        for _ in range(self.reps):
            images = self.ebm.purify(images, self.ebm_steps, generator=generator)[0]
            images = self.ddpm.purify(images, self.ddpm_steps, generator)
        return images


class PureGenReps(PureGenNaive):
    """PureGen-REPS (§7.5): alternate short EBM and DDPM runs ``reps`` times (defaults T = [10, 50, 5], Table E)."""

    def __init__(self, ebm, ddpm, ebm_steps: int = 10, ddpm_steps: int = 50, reps: int = 5, **kwargs):
        super().__init__(ebm, ddpm, ebm_steps=ebm_steps, ddpm_steps=ddpm_steps, reps=reps, **kwargs)


class PureGenFilt(PureGenNaive):
    """PureGen-FILT (§7.5): rank the whole train set by EBM energy and purify only the ``fraction`` with the highest
    energy (the likely poisons, Fig. 6.1) by NAIVE with T = [ebm_steps, ddpm_steps] (default [0, 125], k = 0.5);
    the rest is kept as is. With ``ddpm=None`` the filtered images get EBM steps only."""

    def __init__(self, ebm, ddpm=None, fraction: float = 0.5, ebm_steps: int = 0, ddpm_steps: int = 125, **kwargs):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction={fraction}: the share of highest-energy images to purify, in (0, 1]")
        Purification.__init__(self, **kwargs)
        self.ebm, self.ddpm = _as_ebm(ebm), (_as_ddpm(ddpm) if ddpm is not None else None)
        self.ebm_steps, self.ddpm_steps, self.reps, self.fraction = ebm_steps, ddpm_steps, 1, fraction
        self.selected: torch.Tensor | None = None

    def models(self):
        return {"ebm": self.ebm, **({"ddpm": self.ddpm} if self.ddpm is not None else {})}

    def settings(self):
        return {**super().settings(), "fraction": self.fraction}

    @torch.no_grad()
    def prepare(self, images, device):
        energies = torch.cat([self.ebm.energy(batch.to(device)).float().cpu()
                              for batch in images.split(self.chunk_size)])
        keep = max(1, round(self.fraction * len(images)))
        self.selected = torch.zeros(len(images), dtype=torch.bool)
        self.selected[energies.topk(keep).indices] = True

    def purify_chunk(self, images, indices, generator):
        chosen = self.selected[indices].to(images.device)
        out = images.clone()
        if chosen.any():
            picked = images[chosen]
            if self.ebm_steps:
                picked = self.ebm.purify(picked, self.ebm_steps, generator=generator)[0]
            if self.ddpm is not None and self.ddpm_steps:
                picked = self.ddpm.purify(picked, self.ddpm_steps, generator)
            out[chosen] = picked
        return out
