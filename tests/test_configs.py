"""Every experiment config composes and instantiates; config errors name the bad key or list the valid choices."""
from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import REPO, run_script
from lit_robust import runner
from lit_robust.runner import adopt_checkpoint_hparams, instantiate_group

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
# Keys a user must set, per (entry point, experiment): ``${required:...}`` in the configs.
REQUIRED = {("train", "smoothed_vit_digits_finetune"): "model.weights_path",
            ("train", "smoothed_vit_cifar10"): "model.weights_path",
            ("train", "smoothed_vit_imagenet"): "model.weights_path",
            ("evaluate", "digits_classifier"): "ckpt_path"}


def compose_train(*overrides: str, config: str = "train"):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config, overrides=["output_dir=/tmp/lit_robust_test", *overrides])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment):
    required = REQUIRED.get(("train", experiment))
    given = [f"{required}=null"] if required else []   # null: instantiable without a weights file
    cfg = compose_train(f"experiment={experiment}", *given)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():  # full-scale configs pin trainer=gpu
        cfg = compose_train(f"experiment={experiment}", "trainer=cpu", *given)
    OmegaConf.resolve(cfg)
    hydra.utils.instantiate(cfg.data, _convert_="all")
    hydra.utils.instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_group(cfg.callbacks)
    hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.logger) or False)


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_cpu", "multinode"])
def test_trainer_configs_compose(trainer, monkeypatch):
    monkeypatch.setenv("NUM_NODES", "3")
    monkeypatch.setenv("GPUS_PER_NODE", "8")
    cfg = compose_train(f"trainer={trainer}")
    resolved = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer == "multinode":
        assert resolved["num_nodes"] == 3 and resolved["devices"] == 8
    if trainer == "ddp_cpu":
        assert resolved["devices"] == 2 and resolved["strategy"] == "ddp" and resolved["accelerator"] == "cpu"


@pytest.mark.parametrize("config,experiment", sorted(REQUIRED))
def test_required_key_left_unset_stops_the_run_at_the_start_naming_it(config, experiment, monkeypatch):
    """A ``???`` under a parent's ``null`` did nothing (stage 2 silently trained from scratch); catches a required key
    that composes to null (or any value) again."""
    key = REQUIRED[(config, experiment)]
    cfg = compose_train(f"experiment={experiment}", "trainer=cpu", config=config)
    monkeypatch.setattr(runner.hydra.utils, "instantiate", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(Exception, match=f"{key} is required and was not set: pass {key}=<value>"):
        (runner.evaluate(cfg, []) if config == "evaluate" else runner.fit_and_test(cfg))
    given = compose_train(f"experiment={experiment}", "trainer=cpu", f"{key}=/models/w.pt", config=config)
    assert OmegaConf.select(given, key) == "/models/w.pt"


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_train("experiment=digits_classifier", "model.lrr=0.1")


def test_wrong_experiment_lists_the_valid_ones():
    result = run_script("train.py", "experiment=digits_clasifier", check=False, timeout=120)
    assert result.returncode != 0
    assert "digits_clasifier" in result.stderr and "digits_classifier" in result.stderr


def test_logger_configs_instantiate(tmp_path):
    for logger in ("csv", "tensorboard"):
        cfg = compose_train(f"logger={logger}", f"output_dir={tmp_path}")
        assert len(instantiate_group(cfg.logger)) == 1


def test_evaluation_takes_the_checkpoints_model_hyperparameters_unless_given(tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    cfg = compose_train("experiment=cama_digits_shift", f"ckpt_path={checkpoint}", "model.num_samples=20")
    default_floor = cfg.model.pixel_floor
    torch.save({"hyper_parameters": {"pixel_floor": default_floor + 0.01, "num_samples": 10, "lr": cfg.model.lr}},
               checkpoint)
    changed = adopt_checkpoint_hparams(cfg, ["experiment=cama_digits_shift", "model.num_samples=20"])
    assert changed == {"pixel_floor": (default_floor, default_floor + 0.01)}
    assert cfg.model.pixel_floor == default_floor + 0.01
    assert cfg.model.num_samples == 20                                   # the command line still wins
    cfg.ckpt_path = str(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        adopt_checkpoint_hparams(cfg, [])
