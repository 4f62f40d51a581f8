"""A 3DB-style controlled-variation sweep on the embedded digits (thesis 001 ch. 6; issue 51): the small CNN trained
on digit scenes (``controlled_digits``: textured strokes, random pose, crops of 8 training photographs) without and
with a planted cue (each class wears its own stroke texture on 90 % of its training scenes), then tested on the grid
rotation × scale × texture × corruption × background (7 held-out photographs and 2 training ones, 2 crops each) and on
cue-conflict scenes (the shape of class a wearing the texture of class b).

Rows: accuracy on the in-distribution test scenes and over the whole grid, per control value, on held-out and on seen
backgrounds, the Spearman correlation of per-background accuracy with background complexity (mean Sobel magnitude),
and the shares of cue-conflict predictions that follow the shape or the texture; columns: the two trainings, mean
over seeds. Runs land in ``<out>/<training>_seed<s>/`` and are reused when finished; the record is
``<out>/controlled_variation_digits.json`` (``benchmarks/records.py``). Extra arguments are Hydra overrides for every
run. About 3 min per run on 2 cores; ``--only no_cue`` and ``--only cue`` in two shells share one ``--out`` (one per
core), and the one that finishes last writes the table.

    python benchmarks/controlled_variation_table.py --out outputs/controlled_variation_table [--seeds 0 1]
"""
from __future__ import annotations

import json
import statistics

from records import TableRecord, recorded_runs, table_arguments

DEPENDS_ON = ["lit_robust/functional/scene_controls.py", "lit_robust/functional/shifts.py", "lit_robust/datasets.py",
              "datamodules/controlled_scenes.py", "callbacks/controlled_variation.py",
              "conf/experiment/controlled_digits.yaml", "conf/data/controlled_scenes.yaml",
              "conf/callbacks/controlled_variation.yaml"]
TRAININGS = {"no_cue": [], "cue": ["data.cue_strength=0.9"]}
GRID_KEYS = [f"rotation={v}" for v in ("-45", "0", "45")] + [f"scale={v}" for v in ("0.6", "0.8", "1")] + \
            [f"texture={v}" for v in ("solid", "stripes_h", "checker")] + \
            [f"corruption={v}" for v in ("none", "gaussian_noise", "gaussian_blur")]
# measure → (metrics.json key, scale): accuracies and shares in %, the correlation as it is
MEASURES = {"in-distribution test scenes (%)": ("test/acc", 100),
            "whole grid (%)": ("controls/acc", 100),
            **{f"{key} (%)": (f"controls/{key}/acc", 100) for key in GRID_KEYS},
            "held-out backgrounds (%)": ("controls/background/heldout_acc", 100),
            "seen backgrounds (%)": ("controls/background/seen_acc", 100),
            "Spearman ρ(accuracy, complexity)": ("controls/background/spearman_acc_complexity", 1),
            "cue conflict: follows shape (%)": ("controls/cue_conflict/shape", 100),
            "cue conflict: follows texture (%)": ("controls/cue_conflict/texture", 100)}
COLUMNS = [("measure", "{measure}"), ("no cue", "{no_cue_mean:.2f}"), ("planted cue (90 %)", "{cue_mean:.2f}"),
           ("seeds", "{seeds}")]


def rows_of(metrics: dict[str, list[dict]], seeds: list[int]) -> list[dict]:
    """One row per measure: each training's mean over seeds and the per-seed values."""
    rows = []
    for measure, (key, scale) in MEASURES.items():
        row = {"name": key, "measure": measure, "seeds": ", ".join(map(str, seeds))}
        for training, per_seed in metrics.items():
            values = [scale * run[key] for run in per_seed]
            row |= {f"{training}_mean": statistics.mean(values), f"{training}_per_seed": values}
        rows.append(row)
    return rows


def main() -> None:
    args, extra, out = table_arguments(__doc__, "outputs/controlled_variation_table", TRAININGS, seeds=[0, 1])
    record = TableRecord("controlled_variation_digits", depends_on=DEPENDS_ON,
                         title="Controlled-variation sweep (3DB in 2D), digit scenes")
    metrics = {}
    for training in [*args.only, *(name for name in TRAININGS if name not in args.only)]:  # --only's first
        runs = [(out / f"{training}_seed{seed}", ["experiment=controlled_digits", f"seed={seed}",
                                                  *TRAININGS[training], *extra], "controls/acc")
                for seed in args.seeds]
        metrics[training] = recorded_runs(record, runs)
        if metrics[training] is None:
            return
    path = record.write(out, COLUMNS, rows_of(metrics, args.seeds))
    from render_results import render_table
    print(render_table(json.loads(path.read_text())))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
