"""Seed 003's Table 1 on the embedded digits: the ``ispl_badnets_digits`` experiment once per defence (no defence,
spectral signatures, activation clustering, ITLM, ISPL) plus a clean-trained reference (no poisons, no filter).

Each run lands in ``<out>/<name>/`` (a finished run is reused, and the record says so). The table uses
BackdoorBench's names: C-Acc = clean test accuracy (``test/acc``), ASR = triggered source-class test images
classified as the target (``poison/asr_x1``, thesis Eq. D.5), RA = the same triggered images still given their true
label (``poison/ra_x1``), DER = defense effectiveness rating against the no-defence run
(``lit_robust.functional.poison_success.defense_effectiveness_rating``), then each filter's removals and precision/recall on the
planted poisons and share of clean samples kept. It is written to ``<out>/ispl_badnets.json`` (command, resolved
configs and their hash, commit, machine: ``benchmarks/records.py``) and to ``<out>/metrics.json`` as flat
``table/<name>/<column>`` keys, and printed as markdown; ``benchmarks/render_results.py`` puts it into
``docs/results.md``. Extra arguments are Hydra overrides applied to every run. Several invocations with different
``--only`` may share one ``--out`` (a run another live invocation is running is skipped); then rerun the full command
once all are done, to write the table from the finished runs.

    python benchmarks/ispl_badnets_table.py --out outputs/ispl_badnets_table [trainer.max_epochs=15]
"""
from __future__ import annotations

import json

from records import TableRecord, read_hydra_config, table_arguments, train_run

from lit_robust.functional.poison_success import defense_effectiveness_rating
from lit_robust.storage.json_files import update_metrics_file

RUNS = {"clean": ["data_filter=none", "data.params.fraction=0"], "none": ["data_filter=none"],
        "spectral_signatures": ["data_filter=spectral_signatures"],
        "activation_clustering": ["data_filter=activation_clustering"], "itlm": ["data_filter=itlm"],
        "ispl": ["data_filter=ispl"]}
LABELS = {"clean": "clean-trained (no poisons)", "none": "no defence",
          "spectral_signatures": "spectral signatures (remove 20 %/class)", "activation_clustering":
          "activation clustering", "itlm": "ITLM (keep 96 %)", "ispl": "ISPL + boosting (this work)"}
METRICS = {"c_acc": "test/acc", "asr": "poison/asr_x1", "ra": "poison/ra_x1", "removed": "filter/removed",
           "precision": "filter/precision", "recall": "filter/recall", "clean_kept": "filter/clean_kept"}
PERCENT = {"c_acc", "asr", "ra", "precision", "recall", "clean_kept"}
COLUMNS = [("defence", "{label}"), ("C-Acc (%)", "{c_acc:.1f}"), ("ASR (%)", "{asr:.1f}"), ("RA (%)", "{ra:.1f}"),
           ("DER (%)", "{der:.1f}"), ("removed", "{removed:.0f}"), ("precision (%)", "{precision:.1f}"),
           ("recall (%)", "{recall:.1f}"), ("clean kept (%)", "{clean_kept:.1f}")]

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/functional/ispl.py",
              "lit_robust/functional/weak_learners.py",
              "lit_robust/functional/backdoor_filters.py",
              "callbacks/weak_learner_filter.py",
              "callbacks/baseline_filters.py",
              "datamodules/poisoned.py",
              "lit_robust/poisons/badnets.py",
              "conf/experiment/ispl_badnets_digits.yaml",
              "conf/data_filter"]


def table_rows(results: dict[str, dict]) -> list[dict]:
    """One row per run: percentages, and DER (%) of each filter against the no-defence run."""
    rows = []
    for name, metrics in results.items():
        row = {"name": name, "label": LABELS[name]}
        row.update({col: metrics[key] * (100.0 if col in PERCENT else 1.0) for col, key in METRICS.items()
                    if key in metrics and metrics[key] is not None})
        if name not in ("clean", "none") and "none" in results:
            none = results["none"]
            row["der"] = 100.0 * defense_effectiveness_rating(none["test/acc"], none["poison/asr_x1"],
                                                              metrics["test/acc"], metrics["poison/asr_x1"])
        rows.append(row)
    return rows


def flat_keys(rows: list[dict]) -> dict[str, float]:
    return {f"table/{row['name']}/{key}": float(value) for row in rows for key, value in row.items()
            if key not in ("name", "label")}


def main() -> None:
    args, extra, out = table_arguments(__doc__, "outputs/ispl_badnets_table", RUNS)
    record = TableRecord("ispl_badnets", depends_on=DEPENDS_ON,
                         title="Seed 003 Table 1 on digits: BadNets pixel trigger, 10 % of class 1")
    results = {}
    for name in args.only:
        metrics, provenance = train_run(out / name, ["experiment=ispl_badnets_digits", *RUNS[name], *extra])
        if metrics:
            results[name] = metrics
            record.add_run(name, run_dir=str(out / name), **provenance)
            record.add_config(name, read_hydra_config(out / name))
    if set(results) != set(args.only):
        print(f"not all runs are finished ({sorted(set(args.only) - set(results))}): no table written")
        return
    rows = table_rows(results)
    update_metrics_file(out / "metrics.json", flat_keys(rows))
    path = record.write(out, COLUMNS, rows)
    from render_results import render_table
    print(render_table(json.loads(path.read_text())))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
