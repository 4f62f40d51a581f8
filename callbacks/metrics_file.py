"""Write a run's final metrics as flat JSON, once, from global rank zero."""
from __future__ import annotations

from pathlib import Path

import lightning as L

from lit_robust.storage.json_files import flat_metrics, update_metrics_file


class MetricsFile(L.Callback):
    """After validation-at-fit-end and test, merge ``trainer.callback_metrics`` into ``<dirpath>/metrics.json``.

    A run dir holds one run: at the first ``setup`` of this callback (the start of the run, before any of the run's
    metrics exist) a ``metrics.json`` left by an earlier run in the same dir is removed, so the file never mixes two
    runs' keys. Everything written during the run is merged: fit-end then test-end, validate then test
    (``evaluate.py``) — the callbacks' numbers included, which they log through ``log_dict`` — and keys another writer
    merged with :func:`update_metrics_file`, whichever writes first. A second ``fit``/``test`` with the same callback
    is the same run and merges too.
    """

    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "metrics.json"
        self.started = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.started:
            return
        self.started = True
        if trainer.is_global_zero:
            self.path.unlink(missing_ok=True)

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            update_metrics_file(self.path, flat_metrics(trainer.callback_metrics))

    def on_fit_end(self, trainer, pl_module):
        self._write(trainer)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != "fit":
            self._write(trainer)

    def on_test_end(self, trainer, pl_module):
        self._write(trainer)
