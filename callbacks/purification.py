"""Purification callbacks: replace the train split of the attached DataModule by its purified version before fitting.

Thesis 000 ch. 6 (PureEBM, Algorithm 1: mid-run Langevin from each training image), ch. 7 (PureGen-DDPM: diffuse to
step t, reverse chain to 0) and §7.5 (PureGen-NAIVE / -REPS / -FILT). Work with any Lightning ``Trainer``:

    trainer = L.Trainer(callbacks=[EBMPurification(EBM.pretrained("digits"), steps=150)])
    trainer.fit(classifier, datamodule=poisoned_digits)

:class:`Purification` does everything but the purification itself: it cuts the train set into fixed-size chunks,
gives each DDP rank a contiguous run of chunks, seeds each chunk's noise from (seed, chunk index) — never from the rank
— so 2 processes produce bit-for-bit the set 1 process does, caches every finished chunk (atomic write + sha256, keyed
by the generative models' weights, the data and the parameters) so an interrupted run keeps its finished chunks and a
repeated run recomputes nothing, gathers the chunks in the original order (padded ``all_gather``, then trimmed), and
swaps ``trainer.datamodule.train_dataset``. Subclasses override :meth:`Purification.purify_chunk` only.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import Dataset

from lit_robust.cache import fingerprint, load_verified, save_atomic
from lit_robust.callbacks.metrics_file import update_metrics_file
from lit_robust.datamodules.base import stack_dataset, train_split_of
from lit_robust.purification_plots import save_before_after_grid, save_trajectory_plot, trajectory_distances


class PurifiedDataset(Dataset):
    """The items of ``base`` with their image replaced by the purified one (targets and any extra fields kept)."""

    def __init__(self, base: Dataset, images: torch.Tensor):
        if len(base) != len(images):
            raise ValueError(f"{len(images)} purified images for a dataset of {len(base)}")
        self.base, self.images = base, images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        item = self.base[index]
        return (self.images[index], *item[1:])


def chunk_seed(seed: int, chunk: int) -> int:
    """The noise seed of one chunk: a function of the run's seed and the chunk's position only."""
    return int(fingerprint("purification-chunk", seed, chunk), 16) % (2 ** 63)


def rank_chunks(n_chunks: int, world_size: int, rank: int) -> range:
    """The contiguous, disjoint run of chunk indices one rank purifies (later ranks may get fewer or none)."""
    per_rank = math.ceil(n_chunks / world_size)
    return range(min(rank * per_rank, n_chunks), min((rank + 1) * per_rank, n_chunks))


class Purification(Callback):
    """Base class: shard, cache, gather and swap in the purified train set (see the module docstring).

    Args:
        cache_dir: folder of the chunk cache (default ``<trainer.default_root_dir>/purified``); point several runs at
            one folder to share purified sets between them.
        chunk_size: images per chunk = per forward batch and per cache file. Part of the cache key and of the noise
            seeding: keep it fixed to reproduce a set.
        seed: noise seed of the purification (independent of the trainer's seed).
        progress: show a progress bar on rank zero.
        plots: on rank zero, save ``plots/<name>_before_after.png`` (poisoned images first, if the DataModule marks
            them with ``poison_mask``) in the trainer's ``default_root_dir`` and merge ``purify/*`` timings into its
            ``metrics.json``.
    """

    def __init__(self, cache_dir: str | None = None, chunk_size: int = 250, seed: int = 0, progress: bool = True,
                 plots: bool = True):
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
        self.cache_dir, self.chunk_size, self.seed, self.progress = cache_dir, chunk_size, seed, progress
        self.plots = plots
        self.key: str | None = None
        self.completed = False
        self.stats: dict[str, float] = {}

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
    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.settings())

    def state_dict(self) -> dict:
        return {"key": self.key, "completed": self.completed, "stats": dict(self.stats)}

    def load_state_dict(self, state_dict: dict) -> None:
        # A resumed fit finds its chunks again through the cache key; keep the record for inspection.
        self.key, self.completed = state_dict.get("key"), state_dict.get("completed", False)
        self.stats = dict(state_dict.get("stats", {}))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        dataset = train_split_of(trainer, type(self).__name__)
        images, _ = stack_dataset(dataset)
        purified = self.purify_dataset(images, trainer, pl_module.device)
        datamodule.train_dataset = PurifiedDataset(dataset, purified)
        if self.plots and trainer.is_global_zero:
            self.report(Path(trainer.default_root_dir), datamodule, images, purified, pl_module.device)

    def report(self, folder: Path, datamodule, images: torch.Tensor, purified: torch.Tensor,
               device: torch.device) -> None:
        """Rank zero only (no collectives here): before/after grid and ``purify/*`` numbers in metrics.json."""
        mask = getattr(datamodule, "poison_mask", None)
        order = torch.cat([mask.nonzero().flatten(), (~mask).nonzero().flatten()]) if mask is not None else \
            torch.arange(len(images))
        shown = order[:10]
        name = type(self).__name__
        save_before_after_grid(images[shown], purified[shown], folder / "plots" / f"{name}_before_after.png")
        update_metrics_file(folder / "metrics.json", {f"purify/{k}": float(v) for k, v in self.stats.items()})

    # ---- the work --------------------------------------------------------------------------------------------------
    def cache_key(self, images: torch.Tensor) -> str:
        weights = {name: fingerprint({k: v for k, v in m.state_dict().items()}) for name, m in self.models().items()}
        return fingerprint(type(self).__name__, weights, self.settings(), self.chunk_size, self.seed,
                           images.float())

    def purify_dataset(self, images: torch.Tensor, trainer: L.Trainer, device: torch.device) -> torch.Tensor:
        """All images purified, identical on every rank; each rank computes (or loads) only its own chunks."""
        started = time.perf_counter()
        self.key = self.cache_key(images)
        folder = Path(self.cache_dir or Path(trainer.default_root_dir) / "purified") / self.key
        for model in self.models().values():
            model.to(device).eval()
        self.prepare(images, device)
        n = len(images)
        n_chunks = math.ceil(n / self.chunk_size)
        world_size, rank = trainer.world_size, trainer.global_rank
        mine = rank_chunks(n_chunks, world_size, rank)
        outputs, computed = [], 0
        bar = self._progress_bar(len(mine), trainer.is_global_zero)
        for chunk in mine:
            rows = slice(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, n))
            path = folder / f"chunk_{chunk:05d}.pt"
            cached = load_verified(path)
            if cached is None or cached.shape != images[rows].shape:
                generator = torch.Generator(device=device).manual_seed(chunk_seed(self.seed, chunk))
                indices = torch.arange(rows.start, rows.stop)
                cached = self.purify_chunk(images[rows].to(device), indices, generator).detach().float().cpu()
                save_atomic(path, cached)
                computed += 1
            outputs.append(cached)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        local = torch.cat(outputs) if outputs else images[:0].float()
        purified = self.gather(local, n, n_chunks, trainer, device)
        self.completed = True
        self.stats = {"seconds": time.perf_counter() - started, "chunks_computed_rank0": computed,
                      "mean_l2_change": (purified - images).flatten(1).norm(dim=1).mean().item()}
        return purified

    def gather(self, local: torch.Tensor, n: int, n_chunks: int, trainer: L.Trainer,
               device: torch.device) -> torch.Tensor:
        """Every rank's chunks in the original order: pad to the largest share, ``all_gather``, trim, concatenate."""
        world_size = trainer.world_size
        if world_size == 1:
            return local
        lengths = []
        for rank in range(world_size):
            chunks = rank_chunks(n_chunks, world_size, rank)
            lengths.append(0 if not chunks else min(chunks.stop * self.chunk_size, n) - chunks.start * self.chunk_size)
        padded = local.new_zeros((max(lengths), *local.shape[1:]))
        padded[: len(local)] = local
        gathered = trainer.strategy.all_gather(padded.to(device)).cpu()
        return torch.cat([gathered[rank, :length] for rank, length in enumerate(lengths)])

    def _progress_bar(self, total: int, is_global_zero: bool):
        if not (self.progress and is_global_zero and total):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{type(self).__name__} (rank 0 chunks)", unit="chunk")


def _as_ebm(ebm):
    from lit_robust.ebm import load_ebm

    return load_ebm(ebm) if isinstance(ebm, str) else ebm


def _as_ddpm(ddpm):
    from lit_robust.ddpm import load_ddpm

    return load_ddpm(ddpm) if isinstance(ddpm, str) else ddpm


class EBMPurification(Purification):
    """PureEBM (PureGen-EBM): ``steps`` mid-run Langevin steps (Eq. 6.7) from each training image (Algorithm 1).

    ``ebm`` is an :class:`~lit_robust.EBM` or a source string for :func:`lit_robust.ebm.load_ebm`
    (``pretrained:digits``, an exported ``.pt``, a ``.ckpt``). ``step_size``/``temperature`` default to the EBM's.
    """

    def __init__(self, ebm, steps: int = 150, step_size: float | None = None, temperature: float | None = None,
                 bf16: bool = False, trajectory_images: int = 32, **kwargs):
        super().__init__(**kwargs)
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
        ``trajectory_images`` clean and poisoned images; the values land in metrics.json as ``purify/fig62_*``."""
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
        update_metrics_file(folder / "metrics.json", {f"purify/fig62_{k}_at_{steps[at]}": float(v[at])
                                                      for k, v in distances.items()})


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
