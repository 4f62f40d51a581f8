"""SCNN on the exam SEMs (thesis 000 §2.3, Tables 2.1–2.2): per SEM, one fit of every η ∈ {0, .01, .1, .33, .7, 1} ×
5 seeds (``experiment=scnn_<sem>``), and one of the same-size fully connected net (C, T) → Y, written as
the SCNN config with only the edges C → Y, T → Y and hidden [16, 16].

Per row: the test MSE of Y (mean ± std over the converged seeds: validation MSE under 0.7 linear / 2 nonlinear, the
thesis' check), how many converged, and Eq. 2.11's ground-truth MSE of each endogenous node's chained prediction on
the verification grid. Written to ``<out>/scnn_exam.json`` (``benchmarks/records.py``); ``render_results.py``
puts it into ``docs/causal_structure.md``. Extra arguments are Hydra overrides for every fit.

    OMP_NUM_THREADS=1 python benchmarks/scnn_table.py --out docs/records
"""
from __future__ import annotations

import torch
from causal_fits import composed, fit, split_rows
from records import TableRecord, table_arguments

DEPENDS_ON = ["lit_robust/models/scnn.py", "lit_robust/models/node_nets.py", "lit_robust/functional/causal_structure.py",
              "lit_robust/functional/structural_equations.py", "datamodules/tabular.py", "conf/experiment/scnn_linear.yaml",
              "conf/experiment/scnn_nonlinear.yaml", "benchmarks/causal_fits.py"]
REPLICAS = 5
ETAS = [0.0, 0.01, 0.1, 0.33, 0.7, 1.0]
CONVERGED_BELOW = {"linear": 0.7, "nonlinear": 2.0}   # the thesis' convergence check on validation MSE
FCNN = ["model.edges=[[C,Y],[T,Y]]", "model.hidden=[16,16]", "model.etas=[0.0]"]
RUNS = {f"{kind}_{sem}": (sem, kind) for sem in ("linear", "nonlinear") for kind in ("scnn", "fcnn")}


def rows_of(sem: str, kind: str, data, model) -> list[dict]:
    """One row per η: Y's test MSE over the converged seeds and each endogenous node's ground-truth error."""
    with torch.no_grad():
        val, test = (model.losses(split_rows(data, split))[0] for split in ("val", "test"))
    errors = model.ground_truth_errors()
    etas = model.hparams.etas
    rows = []
    for k, eta in enumerate(etas):
        replicas = slice(k * len(val) // len(etas), (k + 1) * len(val) // len(etas))
        converged = val[replicas] < CONVERGED_BELOW[sem]
        kept = test[replicas][converged]
        row = {"name": f"{sem}/{kind}/eta{eta:g}", "sem": sem, "model": kind.upper(), "eta": eta,
               "converged": int(converged.sum()), "seeds": len(converged),
               "y_mse": kept.mean().item() if len(kept) else float("nan"),
               "y_std": kept.std().item() if len(kept) > 1 else 0.0, "y_mse_all": test[replicas].mean().item()}
        if kind == "scnn":
            for position, node in enumerate(model.endogenous):
                row[f"gt_{model.hparams.nodes[node]}"] = errors[replicas, position][converged].mean().item()
        rows.append(row)
    return rows


def main() -> None:
    args, extra, out = table_arguments(__doc__, "docs/records", RUNS)
    record = TableRecord("scnn_exam", depends_on=DEPENDS_ON,
                         title="SCNN vs FCNN and η sweep on the exam SEMs (thesis 000 Tables 2.1–2.2)")
    rows = []
    for name in args.only:
        sem, kind = RUNS[name]
        overrides = [f"model.replicas={REPLICAS}", *(FCNN if kind == "fcnn" else [f"model.etas={ETAS}"]), *extra]
        config = composed(f"scnn_{sem}", overrides)
        data, model, seconds = fit(config)
        record.add_config(name, config)
        record.add_run(name, seconds=round(seconds, 1))
        rows += rows_of(sem, kind, data, model)
    columns = [("SEM", "{sem}"), ("model", "{model}"), ("η", "{eta:g}"), ("converged", "{converged}/{seeds}"),
               ("test MSE of Y", "{y_mse:.3f} ± {y_std:.3f}"), ("GT MSE E", "{gt_E:.4f}"), ("GT MSE TQ", "{gt_TQ:.4f}"),
               ("GT MSE P", "{gt_P:.4f}"), ("GT MSE Y", "{gt_Y:.3f}")]
    print(record.write(out, columns, rows))


if __name__ == "__main__":
    main()
