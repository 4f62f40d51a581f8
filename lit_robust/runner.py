"""What ``train.py`` and ``evaluate.py`` share: config → datamodule, model, callbacks, loggers, trainer."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lit_robust.callbacks.metrics_file import MetricsFile

log = logging.getLogger(__name__)
# The Hydra configs: the repo's conf/, installed as this package (pyproject.toml), so they travel with the wheel.
CONFIG_MODULE = "lit_robust.conf"


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a config group mapping name → {_target_: ...} (null entries are skipped)."""
    if not group:
        return []
    return [hydra.utils.instantiate(spec, _convert_="all") for spec in group.values() if spec is not None and "_target_" in spec]


def check_compatible(datamodule: L.LightningDataModule, model: L.LightningModule) -> None:
    """Fail early, naming the config keys, when the data and the model disagree on channels or classes."""
    hparams = getattr(model, "hparams", {})
    for key in ("in_chans", "num_classes"):
        data_value, model_value = getattr(datamodule, key, None), hparams.get(key)
        if data_value is not None and model_value is not None and data_value != model_value:
            raise ValueError(f"model.{key}={model_value} but the data ({type(datamodule).__name__}) has "
                             f"{key}={data_value}: set model.{key}={data_value}")


def adopt_checkpoint_hparams(cfg: DictConfig, command_line: list[str]) -> dict[str, tuple]:
    """Give ``cfg.model`` the hyperparameters saved in ``cfg.ckpt_path`` (as ``load_from_checkpoint`` would), except
    the keys set on the ``command_line`` (Hydra overrides such as ``model.num_samples=20``). Without this, a
    checkpoint trained with e.g. ``model.pixel_floor=0.01`` would be evaluated under the config's default: same
    weights, other model, no error. Returns ``{key: (config value, checkpoint value)}`` for what was changed."""
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
    # mmap: only the hyperparameters are read here; the weights stay on disk until the trainer loads them
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("hyper_parameters", {})
    explicit = {item.split("=", 1)[0].lstrip("+~") for item in command_line}
    changed = {key: (cfg.model[key], value) for key, value in saved.items()
               if key in cfg.model and f"model.{key}" not in explicit and cfg.model[key] != value}
    with open_dict(cfg):
        for key, (config_value, value) in changed.items():
            cfg.model[key] = value
            log.warning(f"model.{key}={value} as saved in the checkpoint (config: {config_value}); set model.{key} "
                        f"on the command line to evaluate otherwise")
    return changed


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Seed, instantiate the run's objects, and save the resolved config in the output dir."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    model = hydra.utils.instantiate(cfg.model, _convert_="all")  # plain types in checkpoints
    check_compatible(datamodule, model)
    callbacks = instantiate_group(cfg.get("callbacks")) + [MetricsFile(str(output_dir))]
    loggers = instantiate_group(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return datamodule, model, trainer


def fit_and_test(cfg: DictConfig) -> None:
    """What ``train.py`` does with a composed config: fit (resuming from ``cfg.ckpt_path`` if set), then test the
    best checkpoint unless ``cfg.test`` is false."""
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)


def run_experiment(experiment: str, overrides: list[str], output_dir: Path) -> dict:
    """``train.py experiment=<experiment> <overrides>`` in this process, writing to ``output_dir``; returns the run's
    ``metrics.json``. For drivers that chain several runs (the flagship, multi-seed tables)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"output_dir={output_dir}", *overrides])
    fit_and_test(cfg)
    return json.loads((output_dir / "metrics.json").read_text())
