"""In-process fits of the causal-structure experiments for their table commands (``scnn_table.py``,
``cshtest_table.py``): an experiment's config composed with overrides, its DataModule and LightningModule built from
it, fitted by a bare Trainer (no checkpoints, no logger) — these models vectorise every η / hypothesis / seed of a
table cell, so one fit is one cell and a whole table takes minutes on one core."""
from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import OmegaConf

from lit_robust.run.runner import compose_experiment


def composed(experiment: str, overrides: list[str]) -> dict:
    """The resolved config of ``experiment=<experiment>`` with ``overrides`` (nothing is written: no output folder)."""
    return OmegaConf.to_container(compose_experiment(experiment, overrides, Path("unused")), resolve=True)


def fit(config: dict) -> tuple[L.LightningDataModule, L.LightningModule, float]:
    """Build and fit the config's data and model for ``trainer.max_epochs``; returns them and the seconds taken."""
    L.seed_everything(config["seed"], verbose=False)
    data = hydra.utils.instantiate(config["data"], _convert_="all")
    model = hydra.utils.instantiate(config["model"], _convert_="all")
    started = time.time()
    L.Trainer(max_epochs=config["trainer"]["max_epochs"], accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(model, data)
    return data, model.eval(), time.time() - started


def split_rows(data: L.LightningDataModule, split: str) -> torch.Tensor:
    """All rows of a tabular DataModule's split as one tensor."""
    return getattr(data, f"{split}_dataset").tensors[0]
