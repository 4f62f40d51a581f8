"""Purification defended vs undefended over several seeds: mean and std of attack success and natural accuracy.

    OMP_NUM_THREADS=1 python benchmarks/purification_seeds.py --out outputs/purify_narcissus_eps32 --seeds 0 1 2 \
        --run undefended=narcissus_digits --run PureEBM=pureebm_narcissus_digits [--set key=value ...]

``--run name=experiment[:override:override...]`` adds one row (per-run overrides are ``:``-separated, e.g.
``PureEBM-P=pureebm_narcissus_digits:callbacks.purification.ebm=outputs/ebm_p/checkpoints/last.ckpt``); ``--set``
overrides apply to every run. The seed drives everything in a run (poison crafting, purification noise, classifier
init). Each (run, seed) writes to ``<out>/<name>/seed<k>/`` and is skipped when that run already has its test
metrics, so several invocations with different ``--seeds`` can share one ``--out`` (one process per core) and a last
one aggregates. ``<out>/metrics.json`` gets ``table/<name>/<metric>/{mean,std,n}`` and, for every defended run, the
thesis bounds against the first (undefended) run: attack success as a fraction of the undefended mean (≤ 0.25) and
the natural-accuracy drop in points (≤ 5).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lit_robust.callbacks.metrics_file import update_metrics_file
from lit_robust.runner import run_experiment

SUCCESS_METRICS = ("poison/asr_x1", "poison/asr_x3", "poison/target_success")  # backdoors: ASR ×1/×3; GM/BP: Eq. D.4
METRICS = (*SUCCESS_METRICS, "poison/natural_acc")
MAX_ASR_FRACTION, MAX_ACC_DROP = 0.25, 0.05


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
                            f"{key}/std": statistics.stdev(values) if len(values) > 1 else 0.0})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run", action="append", required=True, help="name=experiment[:override...]; first = undefended")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    args = parser.parse_args()
    runs = [parse_run(spec) for spec in args.run]
    for seed in args.seeds:
        for name, experiment, overrides in runs:
            run_dir = args.out / name / f"seed{seed}"
            if finished_metrics(run_dir) is None:
                run_experiment(experiment, [*args.set, *overrides, f"seed={seed}"], run_dir)
    per_seed = {name: {int(d.name[4:]): m for d in sorted((args.out / name).glob("seed*"))
                       if (m := finished_metrics(d)) is not None} for name, _, _ in runs}
    summary = summarise(per_seed)
    update_metrics_file(args.out / "metrics.json", summary)
    print_table(per_seed, summary)


if __name__ == "__main__":
    main()
