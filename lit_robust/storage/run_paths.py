"""The paths a run reads and writes: expanded once, in one place, and a run dir that holds one run.

- ``~`` and ``$VAR`` in every string setting (``data_dir``, ``cache_dir``, ``ckpt_path``, ``weights_path``, and
  ``$LIT_ROBUST_DATA`` read through ``${oc.env:...}``) are expanded by :func:`expand_config_paths` at the start of a
  run, so every module that later receives the path sees the same folder (otherwise one wrote to a folder named
  ``~`` while another wrote to ``$HOME``).
- A run dir holds one run (:func:`check_run_dir`): an earlier run's files there (``RUN_OUTPUTS``) stop a new run at
  the start unless it resumes from a checkpoint in that dir or ``overwrite=true``. Hydra's own ``.hydra/`` and job
  log, written before the run starts, do not count.
- A run never writes through a symbolic link (:func:`refuse_symlink`): a linked ``metrics.json``, ``config.yaml``,
  log or checkpoint would change a file outside the run dir.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig

# What a run writes into its output dir (MetricsFile, runner.build, ModelCheckpoint, the CSV/TensorBoard loggers).
RUN_OUTPUTS = ("metrics.json", "config.yaml", "checkpoints", "csv", "tensorboard")


def expand_path(value: str, key: str) -> str:
    """``value`` with ``~`` and ``$VAR`` / ``${VAR}`` expanded; an unset variable fails naming ``key``."""
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise ValueError(f"{key}={value} uses the environment variable ${unset.group(1)}, which is not set: set it, "
                         f"or give {key} a path without it")
    return expanded


def expand_config_paths(node: DictConfig | ListConfig, key: str = "") -> None:
    """Replace, in place, every string of the config that starts with ``~`` or holds ``$`` (after interpolation)
    by :func:`expand_path` of it."""
    items = node.items() if isinstance(node, DictConfig) else enumerate(node)
    for name, value in list(items):
        child = f"{key}.{name}" if key and isinstance(node, DictConfig) else (f"{key}[{name}]" if key else str(name))
        if isinstance(value, (DictConfig, ListConfig)):
            expand_config_paths(value, child)
        elif isinstance(value, str) and (value.startswith("~") or "$" in value):
            node[name] = expand_path(value, child)


def check_run_dir(output_dir: str | Path, ckpt_path: str | None, overwrite: bool, resumes: bool) -> None:
    """Refuse a run dir holding an earlier run's files (``RUN_OUTPUTS``) unless the run ``resumes`` from
    ``ckpt_path`` inside it or ``overwrite``; refuse any symbolic link among the files a run writes there."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return
    for entry in [*(folder / name for name in RUN_OUTPUTS), *folder.glob("*.log")]:
        refuse_symlink(entry)
        if entry.is_dir():
            for inner in entry.rglob("*"):
                refuse_symlink(inner)
    earlier = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    resuming = resumes and ckpt_path and folder.resolve() in Path(ckpt_path).resolve().parents
    if earlier and not resuming and not overwrite:
        raise FileExistsError(f"output dir {folder} holds an earlier run ({', '.join(earlier)}), which this run "
                              f"would overwrite: choose another hydra.run.dir, resume it (ckpt_path={folder}/"
                              f"checkpoints/last.ckpt), or pass overwrite=true to replace it")


def refuse_symlink(path: Path) -> Path:
    """``path``, unless it is a symbolic link (a write would land wherever the link points)."""
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link (to {os.readlink(path)}); a run does not write through "
                              f"links, which would change a file outside its output dir: remove the link or choose "
                              f"another hydra.run.dir")
    return path
