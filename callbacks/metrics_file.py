"""Write a run's final metrics as flat JSON, once, from global rank zero."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning as L
import torch

from lit_robust.run_paths import refuse_symlink


def flat_metrics(metrics: dict) -> dict[str, float]:
    """``{name: float}`` from Lightning's ``callback_metrics`` (tensors, numbers)."""
    out = {}
    for name, value in metrics.items():
        value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write JSON to a temporary file and rename it over ``path``, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=True))
    os.replace(tmp, path)


def update_metrics_file(path: str | Path, metrics: dict[str, float]) -> dict[str, float]:
    """Merge ``metrics`` into the JSON file at ``path`` (NaN kept as NaN) and return the merged content."""
    path = refuse_symlink(Path(path))
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update({k: (v if not (isinstance(v, float) and math.isnan(v)) else float("nan")) for k, v in metrics.items()})
    write_json_atomic(path, merged)
    return merged


class MetricsFile(L.Callback):
    """After validation-at-fit-end and test, merge ``trainer.callback_metrics`` into ``<dirpath>/metrics.json``.

    A run dir holds one run: at the first ``setup`` of this callback (the start of the run, before any of the run's
    metrics exist) a ``metrics.json`` left by an earlier run in the same dir is removed, so the file never mixes two
    runs' keys. Everything written during the run is merged: fit-end then test-end, validate then test
    (``evaluate.py``), and the keys other callbacks merge with :func:`update_metrics_file` (robustness and
    counterfactual reports, at test end) whichever writes first. A second ``fit``/``test`` with the same callback is
    the same run and merges too.
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
