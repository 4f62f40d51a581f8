"""What ``train.py`` and ``evaluate.py`` share: config → datamodule, model, callbacks, loggers, trainer.

Safe by default: a config group choice (``experiment=``, ``data=``, ``model=``, ...) is never a path
(``../model/ebm``); numeric settings are checked against the constructors' annotations and their domains
(``lit_robust.run.config_checks``: ``trainer.max_epochs`` ≥ 1, ``lr`` > 0, patch sizes within the images) before anything
is built; checkpoints are read with ``weights_only=True`` only (see ``lit_robust.storage.serialization``), refused when their
weights are not finite, and are data, never code: their hyperparameters are adopted only as plain values of the model
config's keys and types (a ``_target_`` is refused), and the model class they record is compared by name, never
imported. Checkpoints record the model's ``_target_``, the training images' shape, dataset and classes
(``checkpoint["lit_robust"]``); evaluating one with another model class, image size or dataset fails at the start.
A run dir holds one run, never written through links, with ``~`` and ``$VAR`` expanded once for every path
(``lit_robust.storage.run_paths``; ``overwrite=true`` replaces an earlier run). A
non-finite ``test/*`` metric (a diverged model, NaN weights) is logged as a warning and counted in ``metrics.json``
as ``test/non_finite``; the run still succeeds, so its other numbers stay inspectable. ``smoke=true`` shrinks any
run to seconds on a CPU (``shrink_for_smoke``, ``conf/smoke.yaml``); an experiment's documented
``headline_metrics`` are checked at the end of every run (``check_headline_metrics``).
"""
from __future__ import annotations

import json
import logging
import math
import types
import typing
from importlib import resources
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lit_robust.callbacks.exact_resume import CSVHistory, RNGState
from lit_robust.callbacks.metrics_file import MetricsFile
from lit_robust.datamodules.base import check_trained_on
from lit_robust.machine import fast_precision, use_available_cores
from lit_robust.run.config_checks import check_domains, checked_hparams
from lit_robust.run.experiment_names import CONFIG_MODULE, check_choices, check_experiment
from lit_robust.storage.json_files import flat_metrics, update_metrics_file
from lit_robust.storage.run_paths import check_run_dir, expand_config_paths, refuse_symlink
from lit_robust.storage.serialization import check_checkpoint, load_plain

log = logging.getLogger(__name__)


def required(hint: str = "", *, _node_) -> None:
    """``key: ${required:'how to set it'}`` — a key the user must set, failing when the config is first resolved
    (``check_numbers`` at the start of a run) with its name. ``???`` cannot do this where a parent config (the model
    group, ``train.yaml``) sets the key to null: an OmegaConf merge never lets ``???`` replace a value."""
    key = _node_._get_full_key(None)
    raise ValueError(f"{key} is required and was not set: pass {key}=<value> ({hint})" if hint else
                     f"{key} is required and was not set: pass {key}=<value>")


if not OmegaConf.has_resolver("required"):
    OmegaConf.register_new_resolver("required", required)
if not OmegaConf.has_resolver("fast_precision"):
    OmegaConf.register_new_resolver("fast_precision", fast_precision)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a config group mapping name → {_target_: ...} (null entries are skipped)."""
    if not group:
        return []
    return [hydra.utils.instantiate(spec, _convert_="all") for spec in group.values() if spec is not None and "_target_" in spec]


def check_numbers(cfg: DictConfig) -> None:
    """Fail naming the key when a numeric setting is not a number: ``seed``, and every argument annotated ``int`` or
    ``float`` of the ``_target_`` classes in the config (``model.lr=abc`` fails here, not inside the optimiser)."""
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        raise ValueError(f"seed={cfg.get('seed')!r} is not an integer: pass e.g. seed=0")
    for key, spec in _targets(OmegaConf.to_container(cfg, resolve=True)):
        try:
            hints = typing.get_type_hints(hydra.utils.get_class(spec["_target_"]).__init__)
        except Exception:  # an unresolvable annotation or target: instantiation will say what is wrong
            continue
        for name, value in spec.items():
            wanted = _numeric(hints.get(name))
            if wanted and value is not None and (isinstance(value, bool) or not isinstance(value, wanted)):
                raise ValueError(f"{key}.{name}={value!r} is not {'an integer' if wanted == (int,) else 'a number'}: "
                                 f"set {key}.{name}=<number>")


def _targets(node, key: str = ""):
    """(dotted key, mapping) of every mapping with a ``_target_`` in a resolved config."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield key, node
        for name, value in node.items():
            yield from _targets(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _targets(value, f"{key}[{index}]")


def _numeric(hint) -> tuple[type, ...] | None:
    """The types a value annotated ``hint`` may have if it is ``int``/``float`` (optionally ``| None``), else None."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = set(typing.get_args(hint)) - {type(None)} if union else {hint}
    if options == {int}:
        return (int,)
    if options in ({float}, {int, float}):
        return (int, float)
    return None


def check_compatible(datamodule: L.LightningDataModule, model: L.LightningModule) -> None:
    """Fail early, naming the config keys, when the data and the model disagree on channels or classes."""
    hparams = getattr(model, "hparams", {})
    for key in ("in_chans", "num_classes"):
        data_value, model_value = getattr(datamodule, key, None), hparams.get(key)
        if data_value is not None and model_value is not None and data_value != model_value:
            raise ValueError(f"model.{key}={model_value} but the data ({type(datamodule).__name__}) has "
                             f"{key}={data_value}: set model.{key}={data_value}")


def check_image_size(image_shape: tuple[int, ...], model: L.LightningModule, recorded: dict) -> None:
    """Fail naming the keys when the data's images (C, H, W) differ from the checkpoint's training images or, unless
    the model resizes its inputs (``resizes_inputs``), from the model's ``img_size``."""
    trained = tuple(recorded.get("input_shape") or ())
    if trained and tuple(trained[-2:]) != tuple(image_shape[-2:]):
        raise ValueError(f"the checkpoint was trained on {'×'.join(map(str, trained))} images but the data gives "
                         f"{'×'.join(map(str, image_shape))}: use the training run's data (data=..., "
                         f"data.img_size={trained[-1]})")
    size = getattr(model, "hparams", {}).get("img_size")
    if isinstance(size, int) and not getattr(model, "resizes_inputs", False) and image_shape[-2:] != (size, size):
        raise ValueError(f"model.img_size={size} but the data ({'×'.join(map(str, image_shape))} images) has "
                         f"img_size={image_shape[-1]}: set model.img_size={image_shape[-1]} or data.img_size={size}")


class CheckpointRecord(L.Callback):
    """Adds ``checkpoint["lit_robust"] = {"model_target", "input_shape", "source_dataset", "num_classes"}``
    (Lightning stores neither the class nor the data), and at setup checks the data against the model and
    ``recorded`` (a loaded checkpoint's record: image shape, ``check_trained_on``)."""

    def __init__(self, model_target: str, recorded: dict | None = None):
        self.model_target, self.recorded, self.input_shape = model_target, recorded or {}, None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        check_trained_on(self.recorded, datamodule)
        for split in ("train_dataset", "val_dataset", "test_dataset"):
            dataset = getattr(datamodule, split, None)
            item = dataset[0] if dataset is not None and len(dataset) else None
            image = item[0] if isinstance(item, (tuple, list)) else item
            if hasattr(image, "shape"):
                self.input_shape = tuple(int(n) for n in image.shape)
                check_image_size(self.input_shape, pl_module, self.recorded)
                return

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["lit_robust"] = {"model_target": self.model_target,
                                    "input_shape": list(self.input_shape) if self.input_shape else None,
                                    "source_dataset": getattr(trainer.datamodule, "source_dataset", None),
                                    "num_classes": getattr(trainer.datamodule, "num_classes", None)}


def read_checkpoint(cfg: DictConfig) -> dict:
    """The checkpoint at ``cfg.ckpt_path`` (tensor data memory-mapped), refused if it holds anything but tensors and
    plain values, and checked to be of the model ``cfg.model._target_``."""
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
    checkpoint = load_plain(path, "checkpoint", mmap=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"ckpt_path={path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint: pass a "
                         ".ckpt written by train.py (<run>/checkpoints/)")
    saved, wanted = (checkpoint.get("lit_robust") or {}).get("model_target"), cfg.model.get("_target_")
    if saved and wanted and saved != wanted:  # by name: nothing a file names is imported
        raise ValueError(f"ckpt_path={path} holds a {saved} but the config builds a {wanted}: pass the experiment= "
                         f"of the training run that wrote it (see its config.yaml)")
    return checkpoint


def adopt_checkpoint_hparams(cfg: DictConfig, command_line: list[str], checkpoint: dict | None = None
                             ) -> dict[str, tuple]:
    """Give ``cfg.model`` the hyperparameters saved in ``cfg.ckpt_path`` (as ``load_from_checkpoint`` would), except
    the keys set on the ``command_line`` (Hydra overrides such as ``model.num_samples=20``). Without this, a
    checkpoint trained with e.g. ``model.pixel_floor=0.01`` would be evaluated under the config's default: same
    weights, other model, no error. Only plain values of the keys and types ``cfg.model`` has are adopted, never a
    ``_target_`` (``config_checks.checked_hparams``). ``checkpoint``: the one ``read_checkpoint(cfg)`` returned (read
    if None).
    Returns ``{key: (config value, checkpoint value)}`` for what was changed."""
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(cfg)
    saved = checked_hparams(checkpoint.get("hyper_parameters", {}), cfg.model, cfg.ckpt_path)
    explicit = {item.split("=", 1)[0].lstrip("+~") for item in command_line}
    changed = {key: (cfg.model[key], value) for key, value in saved.items()
               if f"model.{key}" not in explicit and cfg.model[key] != value}
    with open_dict(cfg):
        for key, (config_value, value) in changed.items():
            cfg.model[key] = value
            log.warning(f"model.{key}={value} as saved in the checkpoint (config: {config_value}); set model.{key} "
                        f"on the command line to evaluate otherwise")
    return changed


def cpu_trainer_without_sync_batchnorm(trainer_cfg: DictConfig) -> None:
    """Turn ``sync_batchnorm`` off when the trainer runs on CPU: torch's SyncBatchNorm only works on GPU modules, and
    the multi-node/DDP configs set it for GPUs, so ``trainer=multinode trainer.accelerator=cpu`` (gloo) would
    otherwise fail when DDP wraps the model. On CPU each process keeps its own batch-norm statistics."""
    accelerator = trainer_cfg.get("accelerator")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and trainer_cfg.get("sync_batchnorm"):
        log.warning("trainer.sync_batchnorm=true needs GPUs; turned off for trainer.accelerator=%s", accelerator)
        with open_dict(trainer_cfg):
            trainer_cfg.sync_batchnorm = False


# Keys of conf/smoke.yaml where a larger number is the cheaper run (fewer ablation positions): raised, not lowered.
SMOKE_RAISED = ("ablation_stride", "val_stride")


def shrink_for_smoke(cfg: DictConfig) -> None:
    """``smoke=true``: shrink a composed config in place so that the whole run (data, poison crafting, purification,
    filtering, training, testing, reports) takes seconds on a CPU — the check that a full-scale config runs end to
    end before booking GPUs. The values are ``conf/smoke.yaml``, laid out as the config; only keys the config has are
    set (a number only lowered — strides, ``SMOKE_RAISED``, only raised — a list replaced), so one file serves every
    experiment. Without CUDA, GPU-only settings (``trainer=gpu``/``ddp``, bf16) become one CPU process in full
    precision, with a warning."""
    smoke = OmegaConf.create(resources.files(CONFIG_MODULE).joinpath("smoke.yaml").read_text())
    with open_dict(cfg):
        _shrink(cfg, smoke)
        if not torch.cuda.is_available() and cfg.trainer.get("accelerator") == "gpu":
            log.warning("smoke=true without CUDA: trainer.accelerator=gpu, precision %s → one CPU process, 32-true",
                        cfg.trainer.get("precision"))
            cfg.trainer.update(accelerator="cpu", devices=1, precision="32-true", strategy="auto")
            cfg.trainer.pop("sync_batchnorm", None)
        if not torch.cuda.is_available():
            for spec in (cfg.get("callbacks") or {}).values():
                if isinstance(spec, DictConfig) and spec.get("bf16"):
                    spec.bf16 = False


def _shrink(node: DictConfig, smoke: DictConfig) -> None:
    for key, value in smoke.items():
        if key not in node:
            continue
        if isinstance(value, DictConfig):
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none():
                _shrink(child, value)
            continue
        try:
            current = node[key]
        except Exception:  # e.g. an unset ${required:...}: smoke does not supply it
            continue
        numbers = type(value) in (int, float) and type(current) is type(value) and current >= 0  # 1.0 ≠ 1 batch
        node[key] = (max if key in SMOKE_RAISED else min)(current, value) if numbers else value


def check_headline_metrics(cfg: DictConfig, metrics: dict) -> list[str]:
    """The experiment's documented ``headline_metrics`` that ``metrics`` lacks or holds as NaN/inf, each logged as
    a warning (the run succeeded, but the number it exists for is not there)."""
    bad = [key for key in cfg.get("headline_metrics") or []
           if not isinstance(metrics.get(key), (int, float)) or not math.isfinite(metrics[key])]
    for key in bad:
        log.warning(f"headline metric {key} is {'missing' if key not in metrics else metrics[key]} in "
                    f"{cfg.output_dir}/metrics.json; the experiment documents it (headline_metrics)")
    return bad


def build(cfg: DictConfig, checkpoint: dict | None = None
          ) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Check the config (group choices, numbers and their domains), seed, instantiate the run's objects, give each
    process its share of the cores (``lit_robust.machine``), and save the resolved config in the output dir.
    ``checkpoint``: the one the run will load (its record is checked against the data)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        check_choices(HydraConfig.get().runtime.choices)
    check_numbers(cfg)
    check_domains(cfg)
    if checkpoint is not None:
        check_checkpoint(checkpoint, cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    model = hydra.utils.instantiate(cfg.model, _convert_="all")  # plain types in checkpoints
    check_compatible(datamodule, model)
    record = CheckpointRecord(cfg.model._target_, (checkpoint or {}).get("lit_robust"))
    callbacks = instantiate_group(cfg.get("callbacks")) + [MetricsFile(str(output_dir)), record, RNGState(),
                                                           CSVHistory(checkpoint)]
    loggers = instantiate_group(cfg.get("logger"))
    cpu_trainer_without_sync_batchnorm(cfg.trainer)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    use_available_cores(trainer.num_devices)
    if trainer.is_global_zero:
        refuse_symlink(output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return datamodule, model, trainer


def evaluate_test_split(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule,
                        ckpt_path: str | None, output_dir: str | Path) -> None:
    """``trainer.test`` (checkpoint loaded with ``weights_only=True``); a non-finite ``test/*`` metric is logged as a
    warning and counted as ``test/non_finite`` in ``metrics.json``."""
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    bad = {key: value for key, value in flat_metrics(trainer.callback_metrics).items()
           if key.startswith("test/") and not math.isfinite(value)}
    if bad:
        log.warning(f"non-finite test metrics {bad} (checkpoint {ckpt_path or 'in memory'}): the model diverged or "
                    f"has NaN/inf weights, so its test numbers mean nothing; retrain (e.g. lower model.lr) or "
                    f"evaluate an earlier checkpoint")
        if trainer.is_global_zero:
            update_metrics_file(Path(output_dir) / "metrics.json", {"test/non_finite": float(len(bad))})


def start_in_run_dir(cfg: DictConfig, resumes: bool) -> None:
    """Expand ``~`` and ``$VAR`` in the config's paths; on global rank zero (the other processes join its run dir),
    refuse a run dir holding an earlier run unless the run ``resumes`` from it or ``overwrite=true``
    (``lit_robust.storage.run_paths``)."""
    expand_config_paths(cfg)
    if rank_zero_only.rank == 0:
        check_run_dir(cfg.output_dir, cfg.ckpt_path, bool(cfg.get("overwrite")), resumes)


def fit_and_test(cfg: DictConfig) -> None:
    """What ``train.py`` does with a composed config: fit (resuming from ``cfg.ckpt_path`` if set), then test the
    best checkpoint unless ``cfg.test`` is false; ``cfg.smoke``: shrunk first (``shrink_for_smoke``). Ends by checking
    the experiment's ``headline_metrics``."""
    if cfg.get("smoke"):
        shrink_for_smoke(cfg)
    start_in_run_dir(cfg, resumes=bool(cfg.ckpt_path))
    checkpoint = read_checkpoint(cfg) if cfg.ckpt_path else None
    datamodule, model, trainer = build(cfg, checkpoint)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        evaluate_test_split(trainer, model, datamodule, best or None, cfg.output_dir)
    check_run_metrics(cfg, trainer)


def check_run_metrics(cfg: DictConfig, trainer: L.Trainer) -> None:
    if trainer.is_global_zero:
        path = Path(cfg.output_dir) / "metrics.json"
        check_headline_metrics(cfg, json.loads(path.read_text()) if path.is_file() else {})


def evaluate(cfg: DictConfig, command_line: list[str]) -> None:
    """What ``evaluate.py`` does: validate and test ``cfg.ckpt_path`` under its saved hyperparameters, except the
    ``model.*`` keys on the ``command_line``; ``cfg.smoke``: shrunk first (``shrink_for_smoke``; the checkpoint's
    hyperparameters still win over it). Ends by checking the experiment's ``headline_metrics``."""
    if cfg.get("smoke"):
        shrink_for_smoke(cfg)
    start_in_run_dir(cfg, resumes=False)
    checkpoint = read_checkpoint(cfg)
    adopt_checkpoint_hparams(cfg, command_line, checkpoint)
    datamodule, model, trainer = build(cfg, checkpoint)
    trainer.validate(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    evaluate_test_split(trainer, model, datamodule, cfg.ckpt_path, cfg.output_dir)
    check_run_metrics(cfg, trainer)


def compose_experiment(experiment: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The config ``train.py experiment=<experiment> <overrides>`` would run with, writing to ``output_dir``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    check_experiment(experiment)
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"output_dir={output_dir}", *overrides],
                      return_hydra_config=True)
    check_choices(cfg.hydra.runtime.choices)  # data=../x, model=../x: before anything in the config is built
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_experiment(experiment: str, overrides: list[str], output_dir: Path) -> dict:
    """``train.py experiment=<experiment> <overrides>`` in this process, writing to ``output_dir``; returns the run's
    ``metrics.json``. For drivers that chain several runs (the flagship, multi-seed tables)."""
    fit_and_test(compose_experiment(experiment, overrides, output_dir))
    return json.loads((output_dir / "metrics.json").read_text())
