"""What a fit resumed from ``last.ckpt`` needs beyond Lightning's own state to end as the uninterrupted fit did.

Lightning restores weights, optimizers, schedulers, loop progress and callback states, but not the global random
number generators: after a resume the shuffling sampler (seeded from torch's RNG at every epoch's ``iter``), random
augmentations and dropout draw other numbers, and the run ends elsewhere. :class:`RNGState` saves Python's, NumPy's
and torch's (CPU and every CUDA device) RNG states of every process in the checkpoint and puts them back before the
first resumed epoch draws from them. Nor does it keep the log: ``CSVLogger`` deletes an existing ``metrics.csv`` and
a resume into a new run dir starts an empty one; :class:`CSVHistory` carries the interrupted run's rows over.

Exact for checkpoints written at an epoch's end (``LastCheckpoint``); a checkpoint written mid-epoch resumes with a
new permutation of that epoch (Lightning warns: the train loader has no ``state_dict``).
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override


def rng_states() -> dict:
    """This process's global RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": [version, list(python_state), gauss_next]}


def set_rng_states(states: dict) -> None:
    """Put back what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    version, python_state, gauss_next = states["python"]
    random.setstate((version, tuple(python_state), gauss_next))


class RNGState(L.Callback):
    """Saves every process's global RNG states in checkpoints and restores them on resume (per rank under DDP: the
    checkpoint holds one entry per process, and each process takes its own)."""

    def __init__(self):
        self._trainer: L.Trainer | None = None
        self._restored: dict | None = None
        self._fit_started = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def state_dict(self) -> dict:
        """Called on every rank while a checkpoint is assembled (so the gather below is reached by all)."""
        mine = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
            return {"ranks": ranks}
        return {"ranks": [mine]}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        ranks = state_dict["ranks"]
        world_size, rank = (self._trainer.world_size, self._trainer.global_rank) if self._trainer else (1, 0)
        if len(ranks) != world_size:
            rank_zero_warn(f"the checkpoint holds the RNG states of {len(ranks)} processes but this fit runs "
                           f"{world_size}: random draws (shuffling, augmentation) continue from the seed, so the "
                           "resumed fit will not repeat the interrupted one exactly")
            return
        self._restored = ranks[rank]
        if self._fit_started:  # a strategy that restores checkpoints after on_fit_start
            set_rng_states(self._restored)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the checkpoint is restored and other callbacks' ``on_fit_start`` work, before the first train
        loader's ``iter`` draws the epoch's permutation (the sanity check runs under Lightning's ``isolate_rng``)."""
        self._fit_started = True
        if self._restored is not None:
            set_rng_states(self._restored)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restored, self._fit_started = None, False


class CSVHistory(L.Callback):
    """Continues each ``CSVLogger``'s ``metrics.csv`` on resume with the interrupted run's rows up to the checkpoint
    (read from its file, which this callback flushes at every checkpoint and epoch start so a killed run loses no
    row that the checkpoint covers).

    ``checkpoint``: the checkpoint the fit resumes from, read before the Trainer exists. Pass it when the resumed
    run logs into the interrupted run's folder: Lightning starts its loggers (and ``CSVLogger`` deletes the file)
    before any callback state is loaded."""

    def __init__(self, checkpoint: dict | None = None):
        self._trainer: L.Trainer | None = None
        state = ((checkpoint or {}).get("callbacks") or {}).get(self.state_key)
        self._carried = self.rows_of(state) if state else None

    def _csv_loggers(self) -> list[CSVLogger]:
        return [logger for logger in (self._trainer.loggers if self._trainer else []) if isinstance(logger, CSVLogger)]

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def state_dict(self) -> dict:
        return {"files": [str(Path(logger.log_dir) / "metrics.csv") for logger in self._csv_loggers()],
                "global_step": self._trainer.global_step if self._trainer else 0}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        if self._carried is None:
            self._carried = self.rows_of(state_dict)

    @staticmethod
    def rows_of(state: dict) -> list[tuple[Path, list[dict] | None]]:
        return [(Path(path), rows_before_step(Path(path), state["global_step"])) for path in state["files"]]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger, (path, rows) in zip(self._csv_loggers() if trainer.is_global_zero else [], self._carried or []):
            if rows is None:
                rank_zero_warn(f"{path}, the log of the run that wrote the checkpoint, is gone (a CSVLogger "
                               "writing to its folder deletes it when it starts, unless CSVHistory is given the "
                               "checkpoint): the resumed run's metrics.csv starts at the checkpoint")
                continue
            logger.experiment.metrics[:0] = rows  # written at the logger's next save, before the new rows
        self._carried = None

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._flush()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()  # the previous epoch's epoch-level rows, logged after its checkpoint

    def _flush(self) -> None:
        for logger in self._csv_loggers():
            logger.save()


def rows_before_step(path: Path, global_step: int) -> list[dict] | None:
    """The rows of a ``metrics.csv`` logged before optimizer step ``global_step`` (a checkpoint's), as read; None
    without the file."""
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(row["step"]) < global_step]
