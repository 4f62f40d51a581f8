"""Transfer influences and the removal experiment on embedded data (thesis 001 ch. 8, Eq. 8.1, §8.2 and Fig. 8.2;
issue 50): which source classes help or hurt the transferred models, and does removing the most harmful ones raise
target accuracy more than removing as many random ones?

Per seed: ``transfer_influence_digits`` trains ``data.num_subsets`` (64) small CNNs on random 5-of-10 subsets of the
MNIST digits, probes each on scikit-learn's 8×8 digits and computes the influence of every source class on every
target test example (``<out>/influence_seed<s>/transfer_influence.pt``). Then one more run of the same experiment
trains sources on explicit subsets: all ten classes (none removed), all but the ``k`` classes of most negative
overall influence (for each ``k`` of ``--remove``), and all but ``k`` random classes (``--random-draws`` draws per
``k``, seeded by the seed), each probed on the target (``<out>/removal_seed<s>/``). Finished runs are reused.

Writes two records (``benchmarks/records.py``): ``transfer_influence_digits`` — per source class, its influence on
its own target digit, its mean influence on the other nine, and its overall influence (×100: points of true-class
probability), mean ± std over seeds; ``transfer_influence_removal`` — target accuracy with none, the most harmful or
random classes removed, mean ± std over seeds, with the classes removed per seed.

    python benchmarks/transfer_influence_table.py --out outputs/transfer_influence_table [--seeds 0 1 2] \
        [--models 64] [--remove 3] [--random-draws 3] [hydra overrides for every run]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from records import ROOT, TableRecord, read_hydra_config, train_run

from lit_robust.datamodules.class_subsets import subset_masks
from lit_robust.functional.transfer_influence import influence_by_target_class, most_harmful_classes
from lit_robust.models.class_subset_ensemble import RESULTS_FILE
from lit_robust.storage.serialization import load_plain

EXPERIMENT = "experiment=transfer_influence_digits"
NUM_CLASSES = 10
DEPENDS_ON = ["lit_robust/functional/transfer_influence.py",
              "lit_robust/models/class_subset_ensemble.py",
              "datamodules/class_subsets.py",
              "conf/experiment/transfer_influence_digits.yaml",
              "conf/data/class_subsets_digits.yaml",
              "conf/model/class_subset_ensemble.yaml"]
INFLUENCE_COLUMNS = [("source class", "{name}"),
                     ("on its own target digit (×100)", "{own_mean:+.2f} ± {own_std:.2f}"),
                     ("mean on the other digits (×100)", "{others_mean:+.2f} ± {others_std:.2f}"),
                     ("overall (×100)", "{overall_mean:+.2f} ± {overall_std:.2f}"),
                     ("most helped target digit, per seed", "{most_helped}")]
REMOVAL_COLUMNS = [("source classes", "{name}"), ("removed, per seed", "{removed}"),
                   ("target accuracy (%)", "{acc_mean:.1f} ± {acc_std:.1f}"), ("seeds", "{seeds}")]


def mean_std(values: list[float], scale: float = 1.0) -> tuple[float, float]:
    return scale * statistics.mean(values), scale * (statistics.stdev(values) if len(values) > 1 else 0.0)


def recorded_run(record: TableRecord, run_dir: Path, overrides: list[str]) -> dict | None:
    """The run's ``transfer_influence.pt`` after :func:`records.train_run` (None when it is not finished)."""
    metrics, provenance = train_run(run_dir, overrides)
    if not metrics:
        print(f"{run_dir} is not finished: no table written")
        return None
    record.add_run(run_dir.name, run_dir=str(run_dir), **provenance)
    record.add_config(run_dir.name, read_hydra_config(run_dir))
    return load_plain(run_dir / RESULTS_FILE, "transfer influence results")


def removal_subsets(harmful: dict[int, list[int]], draws: int, generator: torch.Generator
                    ) -> tuple[list[list[int]], dict[str, tuple[list[int], list[list[int]]]]]:
    """The removal run's source subsets — all classes, then per count ``k`` all but the ``k`` most harmful classes
    (``harmful[k]``) and all but ``k`` random ones (``draws`` times) — and per table row the subsets it averages and
    the classes they leave out."""
    everything = list(range(NUM_CLASSES))
    subsets, rows = [everything], {"all ten": ([0], [])}
    for count, classes in harmful.items():
        dropped = [classes] + [torch.randperm(NUM_CLASSES, generator=generator)[:count].sort().values.tolist()
                               for _ in range(draws)]
        rows[f"all but the {count} most harmful"] = ([len(subsets)], dropped[:1])
        rows[f"all but {count} random ({draws} draws)"] = (list(range(len(subsets) + 1, len(subsets) + 1 + draws)),
                                                            dropped[1:])
        subsets += [[c for c in everything if c not in left_out] for left_out in dropped]
    return subsets, rows


def influence_rows(by_class: list[torch.Tensor]) -> list[dict]:
    """Per source class: influence on its own target digit, mean on the others and overall, over seeds (×100)."""
    rows = []
    for source in range(NUM_CLASSES):
        own = [float(matrix[source, source]) for matrix in by_class]
        others = [float(torch.cat([matrix[source, :source], matrix[source, source + 1:]]).mean())
                  for matrix in by_class]
        overall = [float(matrix[source].mean()) for matrix in by_class]
        row = {"name": str(source), "most_helped": ", ".join(str(int(m[source].argmax())) for m in by_class)}
        for key, values in (("own", own), ("others", others), ("overall", overall)):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values, 100.0)
            row[f"{key}_per_seed"] = values
        rows.append(row)
    return rows


def removal_rows(removal: dict[str, list[tuple[float, list[list[int]]]]], seeds: list[int]) -> list[dict]:
    """Per source (all ten, all but the most harmful, all but random classes): target accuracy over seeds (%)."""
    rows = []
    for name, per_seed in removal.items():
        values = [accuracy for accuracy, _ in per_seed]
        row = {"name": name, "seeds": ", ".join(map(str, seeds)),
               "removed": "; ".join(" ".join(str(classes) for classes in left_out) for _, left_out in per_seed
                                    if left_out) or "–"}
        row["acc_mean"], row["acc_std"] = mean_std(values, 100.0)
        row["acc_per_seed"] = values
        rows.append(row)
    return rows


def arguments() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/transfer_influence_table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", type=int, default=64, help="source models (random class subsets) per seed")
    parser.add_argument("--remove", type=int, nargs="+", default=[3], help="numbers of source classes to remove")
    parser.add_argument("--random-draws", type=int, default=3, help="random removals per number, averaged")
    args, extra = parser.parse_known_args()
    bad = [count for count in args.remove if not 0 < count < NUM_CLASSES]
    if bad or args.random_draws < 1 or args.models < 2:
        parser.error(f"--remove {args.remove} / --random-draws {args.random_draws} / --models {args.models}: remove "
                     f"1 to {NUM_CLASSES - 1} classes, with at least one random draw, estimated from 2 models or more")
    return args, extra


def one_seed(seed: int, args: argparse.Namespace, extra: list[str], out: Path, records: tuple[TableRecord, TableRecord]
             ) -> tuple[torch.Tensor, dict[str, tuple[float, list[list[int]]]]] | None:
    """One seed's influence run and removal run: the (source × target class) influence matrix, and per removal row
    the target accuracy and the classes left out (None when a run is not finished)."""
    results = recorded_run(records[0], out / f"influence_seed{seed}", [EXPERIMENT, f"seed={seed}",
                                                                     f"data.num_subsets={args.models}", *extra])
    if results is None:
        return None
    harmful = {count: most_harmful_classes(results["influence"], count).tolist() for count in args.remove}
    subsets, rows = removal_subsets(harmful, args.random_draws, torch.Generator().manual_seed(seed))
    run_dir = out / f"removal_seed{seed}"
    run = recorded_run(records[1], run_dir, [EXPERIMENT, f"seed={seed}", f"data.num_subsets={len(subsets)}",
                                             "data.subsets=" + json.dumps(subsets).replace(" ", ""), *extra])
    if run is None:
        return None
    if not torch.equal(run["included"], subset_masks(subsets, NUM_CLASSES)):
        raise RuntimeError(f"{run_dir} was trained on other subsets than this invocation wants (its influence run "
                           "changed since): delete it and rerun")
    by_class = influence_by_target_class(results["influence"], results["target_labels"], NUM_CLASSES)
    return by_class, {name: (float(run["target_acc"][indices].mean()), left_out)
                      for name, (indices, left_out) in rows.items()}


def main() -> None:
    args, extra = arguments()
    out = (ROOT / args.out).resolve()
    records = (TableRecord("transfer_influence_digits", depends_on=DEPENDS_ON,
                           title="Transfer influences of the MNIST digit classes on 8×8 digits"),
               TableRecord("transfer_influence_removal", depends_on=DEPENDS_ON,
                           title="Removing the most harmful source classes, MNIST digits → 8×8 digits"))
    by_class, removal = [], {}
    for seed in args.seeds:
        measured = one_seed(seed, args, extra, out, records)
        if measured is None:
            return
        by_class.append(measured[0])
        for name, (accuracy, left_out) in measured[1].items():
            removal.setdefault(name, []).append((accuracy, left_out))
    from render_results import render_table
    for record, columns, rows in ((records[0], INFLUENCE_COLUMNS, influence_rows(by_class)),
                                  (records[1], REMOVAL_COLUMNS, removal_rows(removal, args.seeds))):
        path = record.write(out, columns, rows)
        print(render_table(json.loads(path.read_text())))
        print(f"record: {path}")


if __name__ == "__main__":
    main()
