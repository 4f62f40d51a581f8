"""The flagship on embedded data: Narcissus poisons → PureEBM purification → classifier, defended vs undefended.

    OMP_NUM_THREADS=1 python flagship.py [seed=0] [key=value ...]

Runs ``narcissus_digits`` (undefended) and ``pureebm_narcissus_digits`` (the shipped EBM, 150 Langevin steps) with
the same seed and overrides, each through the same path as ``train.py`` (fit, then test the best checkpoint with the
poison metrics), and prints attack success (×1, ×3 trigger) and natural accuracy side by side; the table is also
written to ``outputs/flagship/<time>/table.json``. Poisons and purified sets are cached under ``data/``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lit_robust.runner import run_experiment

RUNS = {"undefended": "narcissus_digits", "PureEBM": "pureebm_narcissus_digits"}
COLUMNS = ("poison/asr_x1", "poison/asr_x3", "poison/natural_acc")


def main(overrides: list[str]) -> None:
    root = Path("outputs/flagship") / time.strftime("%Y-%m-%d_%H-%M-%S")
    started, table = time.perf_counter(), {}
    for name, experiment in RUNS.items():
        metrics = run_experiment(experiment, overrides, root / name)
        table[name] = {key: metrics.get(key) for key in COLUMNS}
    table["wall_seconds"] = time.perf_counter() - started
    (root / "table.json").write_text(json.dumps(table, indent=2))
    print(f"\n{'':12s}" + "".join(f"{c.split('/')[1]:>14s}" for c in COLUMNS))
    for name in RUNS:
        print(f"{name:12s}" + "".join(f"{100 * table[name][c]:13.1f}%" if table[name][c] is not None else
                                      f"{'n/a':>14s}" for c in COLUMNS))
    print(f"wall time {table['wall_seconds']:.0f} s; runs in {root}")


if __name__ == "__main__":
    main(sys.argv[1:])
