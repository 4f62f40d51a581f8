"""The entry points: ``lit-robust-train``, ``lit-robust-evaluate``, ``lit-robust-flagship`` (console scripts of the
installed package) and the repo-root ``train.py``, ``evaluate.py``, ``flagship.py`` (one-line shims over these).

The configs come from the package (``pkg://lit_robust.conf``, the repo's ``conf/``), so they work after a plain
``pip install``; outputs and data caches are relative to the working directory. A user's own config folder adds
experiments through Hydra's search path: ``lit-robust-train --config-dir ./my_conf experiment=my_exp``, where
``my_conf/experiment/my_exp.yaml`` starts with ``# @package _global_`` like ``conf/experiment/*.yaml``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lit_robust.run.experiment_names import CONFIG_MODULE, check_choices

CONFIG_PATH = f"pkg://{CONFIG_MODULE}"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train(cfg: DictConfig) -> None:
    """``train.py experiment=<name> [trainer=ddp_cpu] [key=value ...]``: fit (resuming from ``ckpt_path=...``), then
    test the best checkpoint; ``metrics.json``, ``config.yaml`` and ``checkpoints/`` land in the run's output dir."""
    check_choices(HydraConfig.get().runtime.choices)  # before Lightning's import
    from lit_robust.run.runner import fit_and_test

    fit_and_test(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def evaluate(cfg: DictConfig) -> None:
    """``evaluate.py experiment=<name> ckpt_path=<run>/checkpoints/best.ckpt [trainer=ddp_cpu]``: validation and the
    test split with every configured (evaluation) callback, writing ``metrics.json`` — the numbers of the training
    run's test phase. The model takes the hyperparameters saved in the checkpoint, except ``model.*`` keys given on
    the command line (e.g. ``model.num_samples=20``)."""
    check_choices(HydraConfig.get().runtime.choices)  # before Lightning's import
    from lit_robust.run import runner

    runner.evaluate(cfg, list(HydraConfig.get().overrides.task))


FLAGSHIP_RUNS = {"undefended": "narcissus_digits", "PureEBM": "pureebm_narcissus_digits"}
FLAGSHIP_COLUMNS = ("poison/asr_x1", "poison/asr_x3", "poison/natural_acc")


def flagship(overrides: list[str] | None = None) -> None:
    """The flagship on embedded data: Narcissus poisons → PureEBM purification → classifier, defended vs undefended.

        python flagship.py [seed=0] [key=value ...]

    Runs ``narcissus_digits`` (undefended) and ``pureebm_narcissus_digits`` (the shipped EBM, 150 Langevin steps)
    with the same seed and overrides, each through the same path as ``train.py`` (fit, then test the best checkpoint
    with the poison metrics), and prints attack success (×1, ×3 trigger) and natural accuracy side by side; the table
    is also written to ``outputs/flagship/<time>/table.json``. Poisons and purified sets are cached under ``data/``.
    """
    overrides = sys.argv[1:] if overrides is None else overrides
    if {"-h", "--help"} & set(overrides):
        print(flagship.__doc__)
        return
    from lit_robust.run.runner import run_experiment

    root = Path("outputs/flagship") / time.strftime("%Y-%m-%d_%H-%M-%S")
    started, table = time.perf_counter(), {}
    for name, experiment in FLAGSHIP_RUNS.items():
        metrics = run_experiment(experiment, overrides, root / name)
        table[name] = {key: metrics.get(key) for key in FLAGSHIP_COLUMNS}
    table["wall_seconds"] = time.perf_counter() - started
    (root / "table.json").write_text(json.dumps(table, indent=2))
    print(f"\n{'':12s}" + "".join(f"{c.split('/')[1]:>14s}" for c in FLAGSHIP_COLUMNS))
    for name in FLAGSHIP_RUNS:
        print(f"{name:12s}" + "".join(f"{100 * table[name][c]:13.1f}%" if table[name][c] is not None else
                                      f"{'n/a':>14s}" for c in FLAGSHIP_COLUMNS))
    print(f"wall time {table['wall_seconds']:.0f} s; runs in {root}")
