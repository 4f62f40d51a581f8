"""Safe by default (issue #45): nothing read from a checkpoint is built or imported, no config group reaches a YAML
outside the config folders, numeric settings outside their domain stop the run before anything is built, and a run
neither overwrites an earlier run's files nor writes through links; ``~`` and ``$VAR`` mean one folder everywhere.
Each refusal is asserted through the entry points (``runner.fit_and_test`` / ``evaluate`` / ``compose_experiment``,
``train.py``) with every file under ``tmp_path``; the data is scikit-learn's 8×8 digits."""
from __future__ import annotations

import io
import json
import os
import pathlib
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from lit_robust import ImageClassifier
from lit_robust.run import runner
from lit_robust.run.config_checks import domain_of
from lit_robust.run.experiment_names import CONFIG_MODULE, shipped_experiments
from lit_robust.storage.json_files import update_metrics_file

ONE_BATCH = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
             "~callbacks.rich_progress_bar", "test=false"]
TINY = ["data=digits_8x8", *ONE_BATCH]


def compose_run(config: str, *overrides: str):
    """The config ``train.py`` / ``evaluate.py`` (``config``) would run with ``overrides``."""
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose(config, overrides=list(overrides))


class ReachedBuild(Exception):
    """Raised by the first instantiation (data, model, callbacks, trainer) under ``building``."""


@pytest.fixture
def building(monkeypatch) -> list:
    """Stop a run at its first instantiation (raising ``ReachedBuild``) and record the config it would have built:
    a refusal that must come before anything is built fails the test with ``ReachedBuild`` instead."""
    built = []

    def reached(spec, *args, **kwargs):
        built.append(spec)
        raise ReachedBuild

    monkeypatch.setattr(runner.hydra.utils, "instantiate", reached)
    return built


# ---- item 1: a checkpoint is data, never code ----------------------------------------------------------------------
class TouchesMarker:
    """Unpickling this creates ``marker``: the stand-in for code run by a crafted file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def opens_marker(marker: Path) -> dict:
    return {"_target_": "builtins.open", "file": str(marker), "mode": "w"}


def unpickles_marker(marker: Path) -> dict:
    buffer = io.BytesIO()
    torch.save(TouchesMarker(marker), buffer)
    return {"_target_": "torch.load", "weights_only": False,
            "f": {"_target_": "io.BytesIO", "initial_bytes": buffer.getvalue()}}


@pytest.mark.parametrize("hyperparameters,key", [
    (lambda marker: {"backbone_kwargs": opens_marker(marker)}, "backbone_kwargs._target_='builtins.open'"),
    (lambda marker: {"backbone_kwargs": unpickles_marker(marker)}, "backbone_kwargs._target_='torch.load'"),
    (opens_marker, "_target_='builtins.open'"),  # the model's own _target_
], ids=["open", "torch.load", "model target"])
def test_checkpoint_hyperparameter_with_a_target_is_refused_and_never_built(tmp_path, hyperparameters, key):
    """Plain tensors and containers only, so ``load_plain`` passes it; the ``_target_`` would run when
    ``cfg.model`` is instantiated with the adopted hyperparameters."""
    marker, path = tmp_path / "MARKER", tmp_path / "evil.ckpt"
    torch.save({"state_dict": ImageClassifier().state_dict(), "hyper_parameters": hyperparameters(marker),
                "lit_robust": {"model_target": "lit_robust.ImageClassifier"}}, path)
    overrides = ["experiment=digits_classifier", *TINY]
    cfg = compose_run("evaluate", *overrides, f"ckpt_path={path}", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(ValueError, match=rf"checkpoint {path}: hyper_parameters.{re.escape(key)}.* would change "
                                         r"what is instantiated \(run\) with the model; refused"):
        runner.evaluate(cfg, overrides)
    assert not marker.exists()


@pytest.mark.parametrize("value", [{"depth": 2}, "0.1"])
def test_checkpoint_hyperparameter_of_another_type_than_the_config(tmp_path, value):
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": value}}, path)
    cfg = compose_run("evaluate", "experiment=digits_classifier", f"ckpt_path={path}")
    with pytest.raises(ValueError, match=rf"checkpoint {path}: hyper_parameters.lr=.* is a "
                                         rf"{type(value).__name__} but the config's model.lr is a float"):
        runner.adopt_checkpoint_hparams(cfg, [])


def test_checkpoint_hyperparameters_of_the_config_are_adopted(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.25, "max_shift": 3, "mean": [0.1], "unknown": {}}},
               path)
    cfg = compose_run("evaluate", "experiment=digits_classifier", f"ckpt_path={path}")
    assert runner.adopt_checkpoint_hparams(cfg, ["model.max_shift=2"]) == {"lr": (2e-3, 0.25), "mean": ([0.5], [0.1])}
    assert (cfg.model.lr, cfg.model.max_shift, list(cfg.model.mean), "unknown" in cfg.model) == (0.25, 2, [0.1], False)


def test_checkpoint_model_class_is_compared_by_name_without_importing_it(tmp_path, monkeypatch):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "lit_robust": {"model_target": "this.Nothing"}}, path)
    monkeypatch.delitem(sys.modules, "this", raising=False)
    cfg = compose_run("evaluate", "experiment=digits_classifier", f"ckpt_path={path}")
    with pytest.raises(ValueError, match="holds a this.Nothing but the config builds a lit_robust.ImageClassifier"):
        runner.read_checkpoint(cfg)
    assert "this" not in sys.modules


# ---- item 2: config group choices are names, never paths ----------------------------------------------------------
def evil_config(tmp_path: Path, group: str) -> tuple[str, Path]:
    """A YAML outside the package whose ``_target_`` creates ``tmp_path/MARKER``, and the ``group=`` choice (a path
    relative to the group's folder) that reaches it."""
    marker = tmp_path / "MARKER"
    (tmp_path / "evil.yaml").write_text(f"_target_: builtins.open\nfile: {marker}\nmode: w\n")
    return os.path.relpath(tmp_path / "evil", REPO / "conf" / group), marker


@pytest.mark.parametrize("group", ["data", "model", "callbacks", "trainer", "logger"])
def test_config_group_choice_that_is_a_path(tmp_path, group):
    choice, marker = evil_config(tmp_path, group)
    with pytest.raises(ValueError, match=rf"{group}={choice} is a path, not a {group} name; use one of: .*"):
        runner.compose_experiment("digits_classifier", [f"{group}={choice}"], tmp_path / "run")
    assert not marker.exists()


def test_train_py_refuses_a_data_choice_that_is_a_path(tmp_path):
    choice, marker = evil_config(tmp_path, "data")
    result = run_script("train.py", "experiment=digits_classifier", f"data={choice}",
                        f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0 and f"data={choice} is a path, not a data name" in result.stderr
    assert "digits_8x8" in result.stderr  # the shipped data configs, listed
    assert not marker.exists() and not (tmp_path / "run" / "config.yaml").exists()


# ---- item 3: settings outside their domain stop the run before anything is built -----------------------------------
@pytest.mark.parametrize("setting,message", [
    ("trainer.max_epochs=0", r"trainer.max_epochs=0 is outside its domain: set trainer.max_epochs to a value ≥ 1, "
                             r"or -1 for no limit"),
    ("model.lr=-0.001", r"model.lr=-0.001 is outside its domain: set model.lr to a value > 0"),
    ("data.batch_size=0", r"data.batch_size=0 is outside its domain: set data.batch_size to a value ≥ 1"),
    ("data.val_fraction=1.5", r"data.val_fraction=1.5 is outside its domain: set data.val_fraction to a value in "
                              r"\[0, 1\]"),
    ("model.lr=nan", r"model.lr=nan is not a number: set model.lr=<number > 0>"),
])
def test_setting_outside_its_domain(tmp_path, building, setting, message):
    with pytest.raises(ValueError, match=message):
        runner.run_experiment("digits_classifier", [*TINY, setting], tmp_path)


def test_learning_rate_0_warns(tmp_path, building):
    with pytest.warns(UserWarning, match=r"model.lr=0: the optimiser will not change the weights"), \
            pytest.raises(ReachedBuild):
        runner.run_experiment("digits_classifier", [*TINY, "model.lr=0"], tmp_path)


@pytest.mark.parametrize("experiment,setting,message", [
    ("narcissus_digits", "data.params.eps=-1", r"data.params.eps=-1 is outside its domain: set data.params.eps to a "
                                               r"value ≥ 0"),  # crafted a trigger of ℓ∞ 1 recorded as -1
    ("badnets_digits", "+data.params.size=40", r"data.params.size has 40, larger than the data's 28×28 images"),
])
def test_poison_setting_outside_its_domain_caches_nothing(tmp_path, building, experiment, setting, message):
    cache = tmp_path / "poisons"
    with pytest.raises(ValueError, match=message):
        runner.run_experiment(experiment, [*ONE_BATCH, setting, f"data.cache_dir={cache}"], tmp_path / "run")
    assert not cache.exists()


def test_patchcleanser_patch_larger_than_the_images(tmp_path, building):
    with pytest.raises(ValueError, match=r"callbacks.patchcleanser.patch_sizes has 40, larger than the data's 28×28 "
                                         r"images: use sizes ≤ 28"):
        runner.run_experiment("patchcleanser_digits", [*TINY, "data.img_size=28",
                                                       "callbacks.patchcleanser.patch_sizes=[2,40]"], tmp_path)


@pytest.mark.parametrize("name,domain", [
    ("max_epochs", "≥ 1, or -1 for no limit"), ("eps_warmup_epochs", "≥ 0"), ("surrogate_epochs", "≥ 1"),
    ("kl_warmup_steps", "≥ 0"), ("refine_steps", "≥ 0"), ("pgd_steps", "≥ 1"), ("num_workers", "≥ 0"),
    ("num_samples", "≥ 1"), ("save_top_k", "≥ 0, or -1 for all"), ("ft_lr", "> 0"), ("encoder_eps", "≥ 0"),
    ("keep_fraction", "in [0, 1]"), ("val_size", "≥ 0"), ("eval_size", "≥ 1"), ("sghmc_burn_in_steps", "≥ 0"),
    ("target_class", "≥ 0"), ("restoration_step_size", "> 0"), ("rho_init", None), ("dy", None),
])
def test_domain_of_a_setting_goes_by_its_name_exceptions_first(name, domain):
    assert getattr(domain_of(name), "text", None) == domain


def test_every_shipped_experiment_is_inside_the_domains(tmp_path):
    """No false refusal: every experiment as shipped, and shrunk by ``smoke=true``, passes the domain checks."""
    for experiment in shipped_experiments():
        cfg = runner.compose_experiment(experiment, [], tmp_path)
        for key in ("weights_path", "classifier_path"):  # a ${required:...} in some: any path will do here
            if key in cfg.model:
                cfg.model[key] = "/models/w.pt"
        runner.check_domains(cfg)
        runner.shrink_for_smoke(cfg)
        runner.check_domains(cfg)


# ---- item 4: one run per run dir, no writes through links, one meaning of ~ and $VAR --------------------------------
def test_run_dir_holding_an_earlier_run(tmp_path, building):
    (tmp_path / "metrics.json").write_text('{"test/acc": 0.5}')
    with pytest.raises(FileExistsError, match=rf"output dir {tmp_path} holds an earlier run \(metrics.json\), which "
                                              r"this run would overwrite: .*pass overwrite=true"):
        runner.run_experiment("digits_classifier", TINY, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"test/acc": 0.5}
    with pytest.raises(ReachedBuild):
        runner.run_experiment("digits_classifier", [*TINY, "overwrite=true"], tmp_path)


def test_run_dir_of_the_checkpoint_a_run_resumes(tmp_path, building):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "lit_robust": {"model_target": "lit_robust.ImageClassifier"}},
               tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ReachedBuild):
        runner.run_experiment("digits_classifier", [*TINY, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"],
                              tmp_path)


def test_evaluate_into_a_training_run_dir_is_refused_without_overwrite(tmp_path, building):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    cfg = compose_run("evaluate", "experiment=digits_classifier", f"ckpt_path={tmp_path / 'best.ckpt'}",
                      f"output_dir={tmp_path}")
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(config.yaml\)"):
        runner.evaluate(cfg, [])


@pytest.fixture(scope="module")
def user_run(tmp_path_factory) -> Path:
    """The run dir of ``train.py --config-dir my_conf experiment=my_exp``: a user's experiment choosing a user's data
    config (Hydra wrote ``.hydra/`` and ``train.log`` into the fresh run dir before the run started)."""
    root = tmp_path_factory.mktemp("user")
    (root / "my_conf" / "experiment").mkdir(parents=True)
    (root / "my_conf" / "data").mkdir()
    (root / "my_conf" / "data" / "my_digits.yaml").write_text("defaults: [digits_8x8]\nbatch_size: 32\n")
    (root / "my_conf" / "experiment" / "my_exp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - digits_classifier\n  - override /data: my_digits\ntask_name: my_exp\n")
    run_script("train.py", "--config-dir", str(root / "my_conf"), "experiment=my_exp", *ONE_BATCH,
               f"hydra.run.dir={root / 'run'}")
    return root / "run"


def test_a_users_config_dir_still_adds_experiments_and_data(user_run):
    config = (user_run / "config.yaml").read_text()
    assert "task_name: my_exp" in config and "batch_size: 32" in config and "sklearn8x8" in config
    assert {".hydra", "train.log", "metrics.json"} <= {p.name for p in user_run.iterdir()}


def test_a_second_run_in_the_dir_of_a_train_py_run(user_run, building):
    metrics = (user_run / "metrics.json").read_text()
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(metrics.json, config.yaml, checkpoints, csv\)"):
        runner.run_experiment("digits_classifier", TINY, user_run)
    assert (user_run / "metrics.json").read_text() == metrics


@pytest.mark.parametrize("name", ["metrics.json", "config.yaml", "train.log", "checkpoints/last.ckpt"])
def test_run_dir_file_that_is_a_link_is_never_written_through(tmp_path, building, name):
    outside, run_dir = tmp_path / "outside.txt", tmp_path / "run"
    outside.write_text("the user's file\n")
    (run_dir / name).parent.mkdir(parents=True)
    (run_dir / name).symlink_to(outside)
    with pytest.raises(FileExistsError, match=rf"{run_dir / name} is a symbolic link \(to {outside}\); a run does "
                                              r"not write through links"):
        runner.run_experiment("digits_classifier", [*TINY, "overwrite=true"], run_dir)
    assert outside.read_text() == "the user's file\n"


def test_metrics_file_that_is_a_link_is_never_merged_into(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"mine": 1}')
    (tmp_path / "metrics.json").symlink_to(outside)
    with pytest.raises(FileExistsError, match="metrics.json is a symbolic link"):
        update_metrics_file(tmp_path / "metrics.json", {"test/acc": 1.0})
    assert json.loads(outside.read_text()) == {"mine": 1}


@pytest.mark.parametrize("data_root,expected", [("~/x", "home/x"), ("$MY_DATA/x", "mine/x"), ("${MY_DATA}", "mine")])
def test_home_and_variables_in_paths_mean_one_folder(tmp_path, monkeypatch, building, data_root, expected):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MY_DATA", str(tmp_path / "mine"))
    monkeypatch.setenv("LIT_ROBUST_DATA", data_root)
    with pytest.raises(ReachedBuild):
        runner.run_experiment("narcissus_digits", ONE_BATCH, tmp_path / "run")
    with pytest.raises(ReachedBuild):
        runner.run_experiment("badnets_digits", [*ONE_BATCH, "data.cache_dir='~/c'"], tmp_path / "run2")
    narcissus, badnets = building
    assert narcissus.cache_dir == str(tmp_path / expected / "poisons")
    assert narcissus.params.surrogate_path == str(tmp_path / expected / "poisons" / "narcissus_surrogate.pt")
    assert badnets.cache_dir == str(tmp_path / "home" / "c")


def test_unset_variable_in_a_path(tmp_path, monkeypatch, building):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    monkeypatch.setenv("LIT_ROBUST_DATA", "$NOT_SET_ANYWHERE/data")
    with pytest.raises(ValueError, match=r"data\.\S+=\$NOT_SET_ANYWHERE/data/poisons\S* uses the environment "
                                         r"variable \$NOT_SET_ANYWHERE, which is not set"):
        runner.run_experiment("narcissus_digits", ONE_BATCH, tmp_path)


def test_a_library_users_cache_dir_with_tilde_is_expanded_where_it_is_written(tmp_path, monkeypatch):
    """``PoisonedDataModule(cache_dir="~/x")`` outside a run (no config to expand): the DataModule, the write check and
    the cache file agree on ``$HOME/x``; no folder literally named ``~`` appears."""
    from lit_robust.datamodules import DigitsDataModule, PoisonedDataModule
    from lit_robust.storage.cache import check_writable

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    dm = PoisonedDataModule(DigitsDataModule(source="sklearn8x8"), attack="badnets", cache_dir="~/poisons")
    assert dm.cache_dir == tmp_path / "home" / "poisons"
    assert check_writable("~/poisons", "data.cache_dir") == tmp_path / "home" / "poisons"
    assert not (tmp_path / "~").exists()
