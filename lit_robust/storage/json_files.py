"""JSON files written atomically, and flat metric dictionaries: what a run writes (metrics.json) and
what its readers merge."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from lit_robust.storage.run_paths import refuse_symlink


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
