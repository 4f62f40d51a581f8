"""Config errors name the bad key or list the valid choices; what smoke=true changes. (That every experiment composes,
instantiates and runs: tests/test_experiments.py.)"""
from __future__ import annotations

import pytest
import torch
from conftest import REPO, run_script
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lit_robust.run import runner
from lit_robust.run.runner import adopt_checkpoint_hparams, instantiate_group

# Keys a user must set, per (entry point, experiment): ``${required:...}`` in the configs.
REQUIRED = {("train", "smoothed_vit_digits_finetune"): "model.weights_path",
            ("train", "smoothed_vit_cifar10"): "model.weights_path",
            ("train", "smoothed_vit_imagenet"): "model.weights_path",
            ("train", "patchcleanser_imagenet"): "model.weights_path",
            ("train", "robust_transfer_digits"): "model.weights_path",
            ("train", "bias_transfer_digits"): "model.weights_path",
            ("evaluate", "digits_classifier"): "ckpt_path"}


def compose_train(*overrides: str, config: str = "train"):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config, overrides=["output_dir=/tmp/lit_robust_test", *overrides])


def test_smoke_shrinks_only_the_keys_a_config_has_and_swaps_gpu_settings_for_cpu(monkeypatch):
    """Every experiment's end-to-end run under smoke=true is tests/test_experiments.py; here, what it changes."""
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: False)
    cfg = compose_train("experiment=smoothed_vit_imagenet", "smoke=true", "trainer.max_epochs=2",
                        "model.weights_path=/models/w.pt")
    runner.shrink_for_smoke(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("cpu", 1, "32-true")
    assert cfg.trainer.max_epochs == 2 and cfg.trainer.limit_train_batches == 1   # lowered, never raised
    assert cfg.data.val_size == 8 and "num_images" not in cfg.data and "stage_epochs" not in cfg.model
    assert cfg.model.weights_path == "/models/w.pt" and cfg.callbacks.certification.patch_sizes == [22]
    poisoned = compose_train("experiment=pureebm_narcissus_digits", "smoke=true")
    runner.shrink_for_smoke(poisoned)
    assert poisoned.data.base.num_images == 100 and poisoned.data.params.steps == 2
    assert poisoned.callbacks.purification.steps == 2 and poisoned.trainer.accelerator == "cpu"


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


def test_last_checkpoint_holds_the_final_epoch_when_validation_stopped_improving(tmp_path):
    """The default callbacks on a fit whose val/acc is best at epoch 0 and falls after: best.ckpt stays at epoch 0,
    last.ckpt (what a resume reads) is the final epoch's. Lightning's own ``save_last`` left it at epoch 0."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/acc", 1.0 / (1 + self.current_epoch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cfg = compose_train(f"output_dir={tmp_path}")
    callbacks = [c for c in instantiate_group(cfg.callbacks) if isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    L.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(Module(), data, data)
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert best["epoch"] == 0 and last["epoch"] == 2 and last["global_step"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
