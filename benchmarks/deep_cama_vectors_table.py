"""Generic deep CAMA vs a discriminative DNN on measurement data with shifted co-parents (seed 002 §4.2, Fig. 14):
``experiment=deep_cama_vectors`` — rows [a, c, x] with Y = argmax(0.2A² − 0.8A + σ_Y ε) over 5 classes, X quadratic
in (Y, C), 1,000 units (450 train / 50 val / 500 test) — trains deep CAMA (Eqs. 9–11) and, with ``model=dense_rows``,
the DNN [64, 16, 32] on the unshifted rows, 3 seeds each. Both are then tested on the same test units with every
co-parent shifted by each of ``SHIFTS`` (X recomputed through the unchanged mechanism, ``shifted_test``).

The paper's claim: shifting C leaves deep CAMA's accuracy unchanged (its prediction p(y|a) p(x|y, c) uses the
mechanism, not the joint distribution of C and X), while the DNN's drops. Each model is trained for the config's
epochs and tested as it ends (the paper keeps the best-validation epoch; 50 validation rows are too few to pick by).
Written to ``<out>/deep_cama_vectors.json``.

    OMP_NUM_THREADS=1 python benchmarks/deep_cama_vectors_table.py --out docs/records
"""
from __future__ import annotations

import torch
from causal_fits import composed, fit
from records import TableRecord, table_arguments

DEPENDS_ON = ["lit_robust/models/deep_cama.py", "lit_robust/models/classifier.py", "lit_robust/models/nets.py",
              "lit_robust/functional/structural_equations.py", "datamodules/tabular.py",
              "conf/data/measurements.yaml", "conf/model/deep_cama_vectors.yaml", "conf/model/dense_rows.yaml",
              "conf/experiment/deep_cama_vectors.yaml", "benchmarks/causal_fits.py"]
SEEDS = (0, 1, 2)
SHIFTS = (-2.0, -1.0, 0.0, 1.0, 2.0)
MODELS = {"cama": ("deep CAMA", []), "dnn": ("DNN [64, 16, 32]", ["model=dense_rows"])}   # --only: cama, dnn
COLUMNS = [("model", "{model}"), ("C shift", "{shift:+.1f}"), ("accuracy (%)", "{acc_mean:.1f} ± {acc_std:.1f}")]


@torch.no_grad()
def shifted_accuracies(model, data, shifts) -> dict[float, float]:
    """Test accuracy (%) of ``model`` on ``data``'s test units with the co-parents shifted by each of ``shifts``."""
    model.eval()
    accuracies = {}
    for shift in shifts:
        rows, labels = data.shifted_test(shift).tensors
        accuracies[shift] = 100 * (model(rows).argmax(-1) == labels).float().mean().item()
    return accuracies


def table_rows(per_seed: dict[str, list[dict[float, float]]], shifts) -> list[dict]:
    """One row per (model, shift): mean and std over seeds, and the seeds' values."""
    rows = []
    for name, runs in per_seed.items():
        for shift in shifts:
            values = [run[shift] for run in runs]
            spread = torch.tensor(values, dtype=torch.float64)
            rows.append({"model": name, "shift": shift, "acc_mean": spread.mean().item(),
                         "acc_std": spread.std().item() if len(values) > 1 else 0.0, "acc_per_seed": values})
    return rows


def main() -> None:
    args, extra, out = table_arguments(__doc__, "docs/records", MODELS)
    record = TableRecord("deep_cama_vectors", depends_on=DEPENDS_ON,
                         title="Deep CAMA vs DNN on measurement data with shifted co-parents C")
    per_seed: dict[str, list[dict[float, float]]] = {}
    for key in args.only:
        name, overrides = MODELS[key]
        for seed in SEEDS:
            config = composed("deep_cama_vectors", [f"seed={seed}", *overrides, *extra])
            data, model, seconds = fit(config)
            per_seed.setdefault(name, []).append(shifted_accuracies(model, data, SHIFTS))
            record.add_config(f"{key}/seed{seed}", config)
            record.add_run(f"{key}/seed{seed}", seconds=round(seconds, 1))
    print(record.write(out, COLUMNS, table_rows(per_seed, SHIFTS)))


if __name__ == "__main__":
    main()
