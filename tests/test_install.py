"""A plain (non-editable) install works from a user's own folder: the wheel carries the configs and the EBM weights,
the console scripts run from an empty directory and write under it, and a user's config folder adds experiments.

The wheel goes into a fresh venv that sees this environment's third-party packages through a ``.pth`` line — a path
added that way has its own ``.pth`` files skipped, so the editable install's finder (``__editable__*.pth``) stays out
and ``lit_robust`` can only come from the wheel."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from conftest import run_checked as _run

TINY = ["experiment=digits_classifier", "data=digits_8x8", "trainer.max_epochs=1", "callbacks.rich_progress_bar=null"]
USER_EXPERIMENT = """# @package _global_
# A user's own experiment: a shipped one on the 8×8 digits for one epoch.
defaults:
  - digits_classifier
  - override /data: digits_8x8

task_name: my_exp
trainer:
  max_epochs: 1
"""


def test_the_wheel_carries_configs_weights_and_console_scripts(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    expected = {f"lit_robust/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert expected and expected <= names
    assert {"lit_robust/weights/ebm_digits.pt", "lit_robust/weights/SHA256SUMS"} <= names  # EBM.pretrained checks
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    for script in ("lit-robust-train", "lit-robust-evaluate", "lit-robust-flagship"):
        assert script in text and (installed["bin"] / script).exists()


def test_installed_package_is_the_wheel_and_finds_configs_weights_and_flagship_help(installed, tmp_path):
    # one interpreter for all (each start imports torch and Lightning): the flagship script's --help, then the checks
    code = ("import runpy, sys; sys.argv = ['lit-robust-flagship', '--help']\n"
            f"try: runpy.run_path({str(installed['bin'] / 'lit-robust-flagship')!r}, run_name='__main__')\n"
            "except SystemExit as stop: assert not stop.code, stop.code\n"
            "import json, lit_robust, importlib.resources as r; from lit_robust import EBM; EBM.pretrained('digits'); "
            "print(json.dumps([lit_robust.__file__, str(r.files('lit_robust.conf').joinpath('train.yaml'))]))")
    stdout = _run([installed["bin"] / "python", "-c", code], tmp_path, installed["env"]).stdout
    assert "Narcissus" in stdout and not (tmp_path / "outputs").exists()
    package, train_yaml = json.loads(stdout.strip().splitlines()[-1])
    assert Path(package).resolve().is_relative_to(installed["venv"].resolve())
    assert Path(train_yaml).resolve().is_relative_to(installed["venv"].resolve())


def test_console_scripts_train_and_evaluate_from_an_empty_folder(installed, tmp_path):
    _run([installed["bin"] / "lit-robust-train", *TINY], tmp_path, installed["env"])
    runs = list(tmp_path.glob("outputs/digits_classifier/*/metrics.json"))  # the experiment's task_name
    assert len(runs) == 1 and json.loads(runs[0].read_text())["test/acc"] > 0
    best = runs[0].parent / "checkpoints" / "best.ckpt"
    _run([installed["bin"] / "lit-robust-evaluate", *TINY, f"ckpt_path={best}"], tmp_path, installed["env"])
    evaluated = list(tmp_path.glob("outputs/evaluate/*/metrics.json"))
    assert len(evaluated) == 1
    assert json.loads(evaluated[0].read_text())["test/acc"] == pytest.approx(
        json.loads(runs[0].read_text())["test/acc"], abs=1e-7)


def test_a_users_config_dir_adds_experiments(installed, tmp_path):
    (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment" / "my_exp.yaml").write_text(USER_EXPERIMENT)
    _run([installed["bin"] / "lit-robust-train", "--config-dir", "my_conf", "experiment=my_exp",
          "callbacks.rich_progress_bar=null", "test=false"], tmp_path, installed["env"])
    config = (next(tmp_path.glob("outputs/my_exp/*/config.yaml"))).read_text()
    assert "max_epochs: 1" in config and "sklearn8x8" in config


@pytest.mark.slow
def test_tiny_flagship_from_the_wheel_writes_only_under_the_working_directory(installed, tmp_path):
    """≈ 1 min: the shipped EBM loads from the installed package; poisons, purified sets and runs land in the cwd."""
    package = installed["venv"] / "lib"
    before = {p for p in package.rglob("*") if "__pycache__" not in p.parts}
    _run([installed["bin"] / "lit-robust-flagship", "trainer.max_epochs=1", "data.params.surrogate_epochs=1",
          "data.params.warmup_epochs=1", "data.params.steps=2", "++callbacks.purification.steps=2",
          "callbacks.rich_progress_bar=null", "data.progress=false"], tmp_path, installed["env"], timeout=900)
    table = json.loads(next(tmp_path.glob("outputs/flagship/*/table.json")).read_text())
    assert table["PureEBM"]["poison/natural_acc"] is not None
    assert (tmp_path / "data" / "poisons").is_dir() and (tmp_path / "data" / "purified").is_dir()
    assert {p for p in package.rglob("*") if "__pycache__" not in p.parts} == before
