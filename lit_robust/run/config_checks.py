"""Checks of a composed config before anything in it is built: the domain of every numeric setting, patch sizes
against the data's image size, and the hyperparameters a checkpoint may hand to the config.

Domains go by the key's name (``DOMAINS``: ``lr`` > 0, ``eps`` ≥ 0, ``*_fraction`` in [0, 1], batch sizes and most
counts ≥ 1, ``max_epochs`` ≥ 1 or -1, ...), wherever the key sits (``trainer.max_epochs``, ``data.params.eps``,
``callbacks.baselines.cnn.max_epochs``), so a new config's settings are covered by their names. A value outside its
domain would otherwise run as silent nonsense (``trainer.max_epochs=0`` tests an untrained model; ``eps=-1`` crafts
a trigger of ℓ∞ 1) or fail after the training it wasted (a PatchCleanser patch larger than the images).

A checkpoint is data, never code: its hyperparameters are adopted only as plain values of the keys and types the
experiment's model config has, and never with a ``_target_`` (which ``hydra.utils.instantiate`` would build).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf


@dataclass(frozen=True)
class Domain:
    """The values a setting may take: ``holds(value)``, described as ``text`` (``"≥ 1"``) in the error."""
    holds: Callable[[float], bool]
    text: str


AT_LEAST_1 = Domain(lambda v: v >= 1, "≥ 1")
NON_NEGATIVE = Domain(lambda v: v >= 0, "≥ 0")
POSITIVE = Domain(lambda v: v > 0, "> 0")
UNIT_INTERVAL = Domain(lambda v: 0 <= v <= 1, "in [0, 1]")
AT_LEAST_1_OR_UNLIMITED = Domain(lambda v: v >= 1 or v == -1, "≥ 1, or -1 for no limit")
AT_LEAST_0_OR_ALL = Domain(lambda v: v >= -1, "≥ 0, or -1 for all")
LEARNING_RATE = Domain(lambda v: v >= 0, "> 0")  # 0 only warns (check_domains): a run that must not learn

# (key name pattern, domain), first match wins: the exceptions before the generic names (``warmup_epochs`` ≥ 0
# before ``*_epochs`` ≥ 1). A key matching none (``rho_init``, ``dx``, ``degrees``) may take any number.
DOMAINS: tuple[tuple[str, Domain], ...] = (
    (r"max_epochs|max_steps", AT_LEAST_1_OR_UNLIMITED),
    (r"save_top_k|num_sanity_val_steps", AT_LEAST_0_OR_ALL),
    (r"(.*_)?lr", LEARNING_RATE),
    (r"(.*_)?(eps|epsilons?)", NON_NEGATIVE),
    (r"(.*_)?fractions?|keep_inliers|rejuvenation|size_threshold|class_floor|budget|label_smoothing|(.*_)?momentum"
     r"|eta|alpha|mean|dropout|value", UNIT_INTERVAL),  # value: a trigger's pixel value, images are in [0, 1]
    (r"pixel_floor", Domain(lambda v: 0 <= v < 0.5, "in [0, 0.5)")),
    (r"limit_train_batches", Domain(lambda v: v > 0, "> 0 (a fraction ≤ 1 or a number of batches)")),
    (r"num_classes", Domain(lambda v: v >= 2, "≥ 2")),
    (r"(.*_)?(warmup|burn_in)_(epochs|steps)|unablated_epochs|stage_epochs|refine_steps|ft_steps|ft_size|val_size"
     r"|every_n_(train_steps|epochs)|limit_(val|test|predict)_batches|num_workers|lime_samples|collect_start"
     r"|(.*_)?seed|(.*_)?class|target_index|position|exogenous|milestones|shifts|(.*_)?shift|(.*_)?weights?"
     r"|weight_decay|beta|lam|data_noise|mu_init_std|sghmc_mdecay|ft_alpha|gradient_clip_val", NON_NEGATIVE),
    (r"(.*_)?step_size|temperature|(.*_)?std|(.*_)?sigma|max_energy_gap|max_grad_norm|gamma_alpha|gamma_beta"
     r"|angle_range|val_check_interval", POSITIVE),
    (r"(.*_)?(batch_size|batches|steps|epochs|size|sizes|samples|images|count|rank|every|stride|width|widths|dims?"
     r"|dim_.*|channels|hidden|k|restarts|rounds|runs|region|reps|multipliers|depth|heads|epoch|timesteps)"
     r"|(.*_)?num_.*|n_samples|in_chans|max_batch|layers_per_block|num_nodes|severity", AT_LEAST_1),
)  # devices (a count, -1, or a list of indices from 0) is left to Lightning's Trainer
_COMPILED = tuple((re.compile(pattern), domain) for pattern, domain in DOMAINS)

# Settings measured in image pixels: each must fit the data's images (``data_image_side``).
PIXEL_SIZES = ("patch_sizes", "mask_patch_sizes", "region", "missingness_region", "ablation_width", "size")

# The side of the images each named source gives without ``img_size`` (datamodules/digits.py, torchvision_sets.py,
# ood.py: an embedded OOD inlier is 28 px).
NATIVE_SIDES = {"mnist5k": 28, "sklearn8x8": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32, "cinic10": 32,
                "svhn": 32, "imagenet": 224, "natural": 28, "digits": 28}


def domain_of(name: str) -> Domain | None:
    """The domain of a numeric setting called ``name`` (the last part of its key), or None for any number."""
    return next((domain for pattern, domain in _COMPILED if pattern.fullmatch(name)), None)


def check_domains(cfg: DictConfig) -> None:
    """Fail, naming the key, the value and the values it may take, when a numeric setting of the composed ``cfg``
    is NaN, outside its domain (``DOMAINS``), or a pixel size (``PIXEL_SIZES``) larger than the data's images;
    warn when a learning rate is 0. Reads the config alone, so it runs before anything is built."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    side = data_image_side(resolved.get("data") or {})
    for key, name, value in _numbers(resolved):
        domain = domain_of(name)
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{key}={value} is not a number: set {key}=<number"
                             f"{f' {domain.text}' if domain else ''}>")
        if domain is not None and not domain.holds(value):
            raise ValueError(f"{key}={value} is outside its domain: set {key} to a value {domain.text}")
        if domain is LEARNING_RATE and value == 0:
            rank_zero_warn(f"{key}=0: the optimiser will not change the weights, so the run evaluates its initial "
                           f"model; set {key} > 0")
        if side is not None and name in PIXEL_SIZES and value > side:
            raise ValueError(f"{key} has {value}, larger than the data's {side}×{side} images: use sizes ≤ {side} "
                             f"(or data.img_size ≥ {value})")


def _numbers(node, key: str = "", name: str = ""):
    """(dotted key, key name, number) of every int/float leaf (list items under their list's key and name)."""
    if isinstance(node, dict):
        for child, value in node.items():
            yield from _numbers(value, f"{key}.{child}" if key else str(child), str(child))
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _numbers(value, key, name)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield key, name, node


def data_image_side(data: dict) -> int | None:
    """The side of the images the ``data`` config gives: its ``img_size``, else its base's (poisoned, shifted
    wrappers), else the native size of its source (``NATIVE_SIDES``); None when unknown."""
    if isinstance(data.get("img_size"), int):
        return data["img_size"]
    if isinstance(data.get("base"), dict):
        return data_image_side(data["base"])
    return next((NATIVE_SIDES[data[key]] for key in ("source", "name", "inlier") if data.get(key) in NATIVE_SIDES),
                None)


# ---- hyperparameters read from a checkpoint ------------------------------------------------------------------------
PLAIN_SCALARS = (type(None), bool, int, float, str)
# Keys hydra.utils.instantiate acts on: _target_ names the code it runs, the others how it calls it.
INSTANTIATION_KEYS = ("_target_", "_args_", "_partial_", "_convert_", "_recursive_")


def checked_hparams(saved: dict, model: DictConfig, checkpoint: str) -> dict:
    """The hyperparameters of ``saved`` (a checkpoint's ``hyper_parameters``) that the experiment's ``model`` config
    has, after refusing, with the checkpoint and the key named: a ``_target_`` (or another ``INSTANTIATION_KEYS``)
    at any depth, the model's own included (it would be instantiated with the model), an interpolation
    (``${...}``), a value that is not plain (scalars, lists, dicts of them), or a type other than the config's (a dict
    where the config has a number). Keys the config lacks are dropped: the model would not take them."""
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {checkpoint}: hyper_parameters is a {type(saved).__name__}, not a mapping of "
                         f"settings; pass a .ckpt written by train.py (<run>/checkpoints/)")
    _check_plain(saved, "hyper_parameters", checkpoint)
    adopted = {}
    for key, value in saved.items():
        if key not in model:
            continue
        config_value = OmegaConf.select(model, key, throw_on_resolution_failure=False)
        if isinstance(config_value, (DictConfig, ListConfig)):
            config_value = OmegaConf.to_container(config_value, resolve=True)
        if not _same_kind(config_value, value):
            raise ValueError(f"checkpoint {checkpoint}: hyper_parameters.{key}={value!r} is a "
                             f"{type(value).__name__} but the config's model.{key} is a {type(config_value).__name__} "
                             f"({config_value!r}); refused. Evaluate a checkpoint written by train.py for this "
                             f"experiment, or set model.{key} on the command line")
        adopted[key] = value
    return adopted


def _check_plain(value, key: str, checkpoint: str) -> None:
    if isinstance(value, dict):
        for child, item in value.items():
            if child in INSTANTIATION_KEYS:
                raise ValueError(f"checkpoint {checkpoint}: {key}.{child}={item!r} would change what is instantiated "
                                 f"(run) with the model; refused — a checkpoint holds settings, never objects to "
                                 f"build. Evaluate a checkpoint written by train.py")
            if not isinstance(child, str):
                raise ValueError(f"checkpoint {checkpoint}: {key} has the key {child!r}, not a string; refused")
            _check_plain(item, f"{key}.{child}", checkpoint)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{key}[{index}]", checkpoint)
    elif not isinstance(value, PLAIN_SCALARS):
        raise ValueError(f"checkpoint {checkpoint}: {key} is a {type(value).__name__}, not a plain value (number, "
                         f"string, bool, list, dict); refused")
    elif isinstance(value, str) and "${" in value:
        raise ValueError(f"checkpoint {checkpoint}: {key}={value!r} is an interpolation, which the config would "
                         f"resolve; refused — a checkpoint holds resolved values")


def _same_kind(config_value, value) -> bool:
    """Whether a checkpoint's ``value`` may replace ``config_value``: either is None, or both numbers (not bools),
    or both of one kind (bool, str, list, dict)."""
    if config_value is None or value is None:
        return True
    numbers = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in (config_value, value)]
    if any(numbers):
        return all(numbers)
    kinds = [bool, str, (list, tuple), dict]
    return any(isinstance(config_value, kind) and isinstance(value, kind) for kind in kinds)
