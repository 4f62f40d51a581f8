"""Purification defended vs undefended over several seeds: mean ± std and max of attack success (PureGen's
poisoning tables), mean ± std of natural accuracy.

    python benchmarks/purification_seeds.py --out outputs/purify_narcissus_eps32 --seeds 0 1 2 \
        --run undefended=narcissus_digits --run PureEBM=pureebm_narcissus_digits [--set key=value ...]

``--run name=experiment[:override:override...]`` adds one row (per-run overrides are ``:``-separated, e.g.
``PureEBM-P=pureebm_narcissus_digits:callbacks.purification.ebm=outputs/ebm_p/checkpoints/last.ckpt``); ``--set``
overrides apply to every run. The seed drives everything in a run (the attacker's surrogate and poison crafting,
purification noise, classifier init). Each (run, seed) writes to ``<out>/<name>/seed<k>/`` and is skipped when that
run already has its test metrics (an interrupted one starts again), so several invocations with different ``--seeds`` can share one ``--out`` (one
process per core, each started with ``OMP_NUM_THREADS=1``) and a last one aggregates. ``<out>/metrics.json`` gets ``table/<name>/<metric>/{mean,std,n}`` and, for every defended run, the
thesis bounds against the first (undefended) run: attack success as a fraction of the undefended mean (≤ 0.25) and
the natural-accuracy drop in points (≤ 5). ``<out>/<table>.json`` (``--table``, default the name of ``--out``) is the
table's record (``benchmarks/records.py``: command, resolved configs and their hash, commit, machine, rows) that
``benchmarks/render_results.py`` puts into ``docs/results.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf
from records import TableRecord

from lit_robust.run.runner import compose_experiment, fit_and_test
from lit_robust.storage.json_files import update_metrics_file, write_json_atomic

SUCCESS_METRICS = ("poison/asr_x1", "poison/asr_x3", "poison/target_success")  # backdoors: ASR ×1/×3; GM/BP: Eq. D.4
METRICS = (*SUCCESS_METRICS, "poison/natural_acc")
MAX_ASR_FRACTION, MAX_ACC_DROP = 0.25, 0.05
HEADERS = {"asr_x1": "attack success ×1 (%)", "asr_x3": "×3 (%)", "target_success": "targeted success (%)",
           "natural_acc": "natural accuracy (%)"}

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/models/ebm.py",
              "lit_robust/models/ddpm.py",
              "lit_robust/functional/langevin.py",
              "callbacks/purification.py",
              "callbacks/poison_metrics.py",
              "datamodules/poisoned.py",
              # the modules that craft Narcissus; the package's __init__ only registers attack names
              "lit_robust/poisons/narcissus.py",
              "lit_robust/poisons/crafted.py",
              "lit_robust/poisons/surrogate.py",
              "lit_robust/models/classifier.py",
              "lit_robust/weights/ebm_digits.pt",
              "conf/data/poisoned_digits.yaml"]


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    name, _, rest = spec.partition("=")
    experiment, *overrides = rest.split(":")
    if not name or not experiment:
        raise SystemExit(f"--run {spec!r}: expected name=experiment[:key=value...]")
    return name, experiment, overrides


def finished_metrics(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if "poison/natural_acc" in metrics else None  # written by the test phase


def summarise(per_seed: dict[str, dict[int, dict]]) -> dict[str, float]:
    """Mean, std (sample; 0 for one seed) and count per run and metric, and the bounds against the first run."""
    summary, means = {}, {}
    for name, seeds in per_seed.items():
        for metric in METRICS:
            values = [m[metric] for m in seeds.values() if metric in m]
            if not values:
                continue
            key = f"table/{name}/{metric.split('/')[1]}"
            means[name, metric] = statistics.mean(values)
            summary.update({f"{key}/mean": means[name, metric], f"{key}/n": float(len(values)),
                            f"{key}/std": statistics.stdev(values) if len(values) > 1 else 0.0,
                            f"{key}/max": max(values)})
            summary.update({f"{key}/seed{seed}": m[metric] for seed, m in seeds.items() if metric in m})
    reference, *defended = per_seed
    for name in defended:
        for metric in SUCCESS_METRICS:
            if (name, metric) in means and means.get((reference, metric)):
                summary[f"bounds/{name}/{metric.split('/')[1]}_fraction_of_{reference}"] = (
                    means[name, metric] / means[reference, metric])
        if (name, METRICS[-1]) in means and (reference, METRICS[-1]) in means:
            summary[f"bounds/{name}/natural_acc_drop"] = means[reference, METRICS[-1]] - means[name, METRICS[-1]]
    return summary


def print_table(per_seed: dict[str, dict[int, dict]], summary: dict[str, float]) -> None:
    shown = [m for m in METRICS if any(f"table/{n}/{m.split('/')[1]}/mean" in summary for n in per_seed)]
    print(f"\n{'run':14s}" + "".join(f"{m.split('/')[1]:>22s}" for m in shown) + "   seeds")
    for name, seeds in per_seed.items():
        cells = []
        for metric in shown:
            key = f"table/{name}/{metric.split('/')[1]}"
            cells.append(f"{100 * summary[key + '/mean']:13.1f} ± {100 * summary[key + '/std']:4.1f} %"
                         if key + "/mean" in summary else f"{'n/a':>22s}")
        print(f"{name:14s}" + "".join(f"{c:>22s}" for c in cells) + f"   {sorted(seeds)}")
    for key, value in summary.items():
        if key.startswith("bounds/"):
            limit = MAX_ACC_DROP if key.endswith("acc_drop") else MAX_ASR_FRACTION
            print(f"{key:70s} {value:7.3f}  ({'met' if value <= limit else 'NOT met'}: ≤ {limit})")


def table_rows(per_seed: dict[str, dict[int, dict]], summary: dict[str, float]
               ) -> tuple[list[tuple[str, str]], list[dict]]:
    """Columns and rows for the record, in percent: success as mean ± std (max), natural accuracy as mean ± std."""
    shown = [m.split("/")[1] for m in METRICS if any(f"table/{n}/{m.split('/')[1]}/mean" in summary for n in per_seed)]
    columns = [("run", "{name}")]
    for metric in shown:
        spread = "" if metric == "natural_acc" else f" (max {{{metric}_max:.1f}})"
        columns.append((HEADERS[metric], f"{{{metric}_mean:.1f}} ± {{{metric}_std:.1f}}" + spread))
    columns.append(("seeds", "{seeds}"))
    rows = []
    for name, seeds in per_seed.items():
        row = {"name": name, "seeds": ", ".join(str(s) for s in sorted(seeds))}
        for metric in shown:
            for stat in ("mean", "std", "max"):
                if f"table/{name}/{metric}/{stat}" in summary:
                    row[f"{metric}_{stat}"] = 100.0 * summary[f"table/{name}/{metric}/{stat}"]
            per_seed_keys = [f"table/{name}/{metric}/seed{seed}" for seed in sorted(seeds)]
            if f"table/{name}/{metric}/mean" in summary:
                row[f"{metric}_per_seed"] = [100.0 * summary[key] for key in per_seed_keys if key in summary]
        rows.append(row)
    return columns, rows


def resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run", action="append", required=True, help="name=experiment[:override...]; first = undefended")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    parser.add_argument("--table", help="name of the table record (<out>/<table>.json); default: the --out folder's")
    args = parser.parse_args()
    runs = [parse_run(spec) for spec in args.run]
    record = TableRecord(args.table or args.out.name, depends_on=[
        *DEPENDS_ON, *sorted({f"conf/experiment/{experiment}.yaml" for _, experiment, _ in runs})])
    for seed in args.seeds:
        for name, experiment, overrides in runs:
            run_dir = args.out / name / f"seed{seed}"
            reused = finished_metrics(run_dir) is not None
            interrupted = run_dir.is_dir() and not reused  # an interrupted run starts again from its beginning
            cfg = compose_experiment(experiment, [*args.set, *overrides, f"seed={seed}",
                                                  *(["overwrite=true"] if interrupted else [])], run_dir)
            saved = run_dir / "resolved_config.json"
            if not reused:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(saved, resolved(cfg))
                fit_and_test(cfg)
            # a reused run keeps the config it ran with; one from before these records gets today's, flagged
            record.add_config(f"{name}/seed{seed}", json.loads(saved.read_text()) if saved.is_file() else resolved(cfg))
            record.add_run(f"{name}/seed{seed}", run_dir=str(run_dir), reused=reused,
                           config="as run" if saved.is_file() else "recomposed now (the run predates the records)")
    per_seed = {name: {int(d.name[4:]): m for d in sorted((args.out / name).glob("seed*"))
                       if (m := finished_metrics(d)) is not None} for name, _, _ in runs}
    summary = summarise(per_seed)
    update_metrics_file(args.out / "metrics.json", summary)
    print_table(per_seed, summary)
    print(f"record: {record.write(args.out, *table_rows(per_seed, summary))}")


if __name__ == "__main__":
    main()
