"""Seed 003's Table 1 on the embedded digits: the ``ispl_badnets_digits`` experiment once per defence (no defence,
spectral signatures, activation clustering, ITLM, ISPL) plus a clean-trained reference (no poisons, no filter).

Each run lands in ``<out>/<name>/`` (a finished run is reused); the table — C = clean test accuracy, A = targeted
misclassification of triggered source-class test images (poison/asr_x1), and each filter's removal precision/recall
and share of clean samples kept — is merged into ``<out>/metrics.json`` with flat keys ``table/<name>/<column>`` and
printed as markdown. Extra arguments are Hydra overrides applied to every run.

    OMP_NUM_THREADS=1 python benchmarks/ispl_badnets_table.py --out outputs/ispl_badnets_table [trainer.max_epochs=15]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lit_robust.callbacks.metrics_file import update_metrics_file

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"clean": ["data_filter=none", "data.params.fraction=0"], "none": ["data_filter=none"],
        "spectral_signatures": ["data_filter=spectral_signatures"],
        "activation_clustering": ["data_filter=activation_clustering"], "itlm": ["data_filter=itlm"],
        "ispl": ["data_filter=ispl"]}
COLUMNS = {"C": "test/acc", "A": "poison/asr_x1", "removed": "filter/removed", "precision": "filter/precision",
           "recall": "filter/recall", "clean_kept": "filter/clean_kept"}
PERCENT = {"C", "A", "precision", "recall", "clean_kept"}


def run(name: str, out: Path, extra: list[str]) -> dict:
    metrics_path = out / name / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if "test/acc" not in metrics:
        command = [sys.executable, "train.py", "experiment=ispl_badnets_digits", f"hydra.run.dir={out / name}",
                   "callbacks.rich_progress_bar=null", *RUNS[name], *extra]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
        metrics = json.loads(metrics_path.read_text())
    return metrics


def table(results: dict[str, dict]) -> dict[str, float]:
    rows = {}
    for name, metrics in results.items():
        for column, key in COLUMNS.items():
            if key in metrics:
                rows[f"table/{name}/{column}"] = metrics[key] * (100.0 if column in PERCENT else 1.0)
    if "ispl" in results and "clean" in results:
        rows["table/ispl/C_drop_vs_clean"] = rows["table/clean/C"] - rows["table/ispl/C"]
    return rows


def markdown(rows: dict[str, float], names: list[str]) -> str:
    lines = ["| defence | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in names:
        cells = [f"{rows[f'table/{name}/{c}']:.1f}" if f"table/{name}/{c}" in rows else "–" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/ispl_badnets_table", help="folder for the runs and the table")
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS), help="subset of the runs")
    args, extra = parser.parse_known_args()
    out = (ROOT / args.out).resolve()
    results = {name: run(name, out, extra) for name in args.only}
    rows = table(results)
    update_metrics_file(out / "metrics.json", rows)
    print(markdown(rows, args.only))


if __name__ == "__main__":
    main()
