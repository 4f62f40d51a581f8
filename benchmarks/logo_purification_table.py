"""Logo / IP purification on the embedded digits (thesis 000 §7.6, Table E.6's shape): at each mixing ratio α, the
logo's success (test digits of the other classes with the logo blended in that the classifier calls the target
class; 000 Eq. D.5) and natural accuracy, undefended / PureEBM / PureGen-DDPM, mean ± std over seeds.

    OMP_NUM_THREADS=1 python benchmarks/logo_purification_table.py --out outputs/logo_purification --seeds 0 1 2 \
        --alphas 0.1 0.2 0.3 0.4 --set callbacks.rich_progress_bar=null

The default rows are ``undefended=logo_digits``, ``PureEBM=pureebm_logo_digits`` and ``PureDDPM=pureddpm_logo_digits``
(the DDPM of ``train.py experiment=ddpm_digits hydra.run.dir=outputs/ddpm_digits``); ``--run name=experiment[:override
...]`` replaces them (the first is the undefended reference), e.g. the thesis' long chain
``--run PureEBM-2000=pureebm_logo_digits:callbacks.purification.steps=2000``; ``--set`` overrides every run. Each
(α, run, seed) writes to ``<out>/alpha<α>/<name>/seed<k>/`` and is reused once it has its test metrics, as in
``purification_seeds.py``. ``<out>/metrics.json`` gets ``alpha<α>/table/<name>/<metric>/...`` and the bounds against
the undefended run; ``<out>/<table>.json`` (``--table``, default ``logo_purification``) is the record: one row per
defence, the logo's success at every α, then natural accuracy at every α.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from purification_seeds import finished_metrics, parse_run, resolved, summarise
from records import TableRecord

from lit_robust.run.runner import compose_experiment, fit_and_test
from lit_robust.storage.json_files import update_metrics_file, write_json_atomic

DEFAULT_RUNS = ("undefended=logo_digits", "PureEBM=pureebm_logo_digits", "PureDDPM=pureddpm_logo_digits")
# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/poisons/logo.py",
              "lit_robust/poisons/badnets.py",   # the logo square's position (badnets_trigger)
              "lit_robust/poisons/crafted.py",
              "lit_robust/models/ebm.py",
              "lit_robust/models/ddpm.py",
              "lit_robust/functional/langevin.py",
              "lit_robust/functional/poison_success.py",
              "callbacks/purification.py",
              "callbacks/poison_metrics.py",
              "datamodules/poisoned.py",
              "lit_robust/models/classifier.py",
              "lit_robust/weights/ebm_digits.pt",
              "conf/data/poisoned_digits.yaml",
              "conf/experiment/logo_digits.yaml",
              "benchmarks/purification_seeds.py"]   # its summary and run reuse


def alpha_key(alpha: float) -> str:
    """``a10`` for α = 0.1: a row key that ``str.format_map`` can read (no dot)."""
    return f"a{round(100 * alpha)}"


def columns(alphas: list[float]) -> list[tuple[str, str]]:
    """Table E.6's layout: the defence, the logo's success at each α, natural accuracy at each α (percent)."""
    def cells(header: str, column: str) -> list[tuple[str, str]]:
        return [(f"{header} α={alpha:g} (%)", f"{{{column}_{alpha_key(alpha)}_mean:.1f}} ± "
                 f"{{{column}_{alpha_key(alpha)}_std:.1f}}") for alpha in alphas]
    return [("defence", "{name}"), *cells("logo success", "asr"), *cells("natural accuracy", "natural_acc"),
            ("seeds", "{seeds}")]


def table_rows(per_alpha: dict[float, dict[str, dict[int, dict]]]) -> tuple[list[dict], dict[str, float]]:
    """One row per defence from ``{α: {name: {seed: metrics}}}``: ``asr_<a>_{mean,std,per_seed}`` (the logo's
    success, ``poison/asr_x1``) and ``natural_acc_<a>_{mean,std,per_seed}`` in percent; also the flat summary
    (``alpha<α>/`` + ``purification_seeds.summarise``) for ``metrics.json``."""
    rows, flat = {}, {}
    for alpha, per_seed in per_alpha.items():
        summary = summarise(per_seed)
        flat.update({f"alpha{alpha:g}/{key}": value for key, value in summary.items()})
        for name, seeds in per_seed.items():
            row = rows.setdefault(name, {"name": name, "seeds": set()})
            for metric, column in (("asr_x1", "asr"), ("natural_acc", "natural_acc")):
                key = f"table/{name}/{metric}"
                if f"{key}/mean" not in summary:
                    continue
                row[f"{column}_{alpha_key(alpha)}_mean"] = 100.0 * summary[f"{key}/mean"]
                row[f"{column}_{alpha_key(alpha)}_std"] = 100.0 * summary[f"{key}/std"]
                row[f"{column}_{alpha_key(alpha)}_per_seed"] = [100.0 * summary[f"{key}/seed{seed}"]
                                                                for seed in sorted(seeds)]
                row["seeds"].update(seeds)
    for row in rows.values():
        row["seeds"] = ", ".join(str(seed) for seed in sorted(row["seeds"]))
    return list(rows.values()), flat


def run_or_reuse(record: TableRecord, label: str, experiment: str, overrides: list[str], run_dir: Path) -> None:
    """Train and test one (α, run, seed) into ``run_dir`` unless it has its test metrics; record its config."""
    reused = finished_metrics(run_dir) is not None
    interrupted = run_dir.is_dir() and not reused   # an interrupted run starts again from its beginning
    cfg = compose_experiment(experiment, [*overrides, *(["overwrite=true"] if interrupted else [])], run_dir)
    saved = run_dir / "resolved_config.json"
    if not reused:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(saved, resolved(cfg))
        fit_and_test(cfg)
    record.add_config(label, json.loads(saved.read_text()))
    record.add_run(label, run_dir=str(run_dir), reused=reused)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--run", action="append", help="name=experiment[:override...]; first = undefended "
                        f"(default: {' '.join(DEFAULT_RUNS)})")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    parser.add_argument("--table", default="logo_purification", help="name of the record (<out>/<table>.json)")
    args = parser.parse_args(argv)
    bad = [alpha for alpha in args.alphas if not 0.0 <= alpha <= 1.0]
    if bad:
        raise SystemExit(f"--alphas {bad}: a mixing ratio is in [0, 1] (the thesis sweeps 0.1 … 0.4 and beyond)")
    runs = [parse_run(spec) for spec in (args.run or DEFAULT_RUNS)]
    configs = sorted({f"conf/experiment/{experiment}.yaml" for _, experiment, _ in runs})
    record = TableRecord(args.table, depends_on=[*DEPENDS_ON, *configs],
                         title="Logo purification: the logo's success and natural accuracy vs α",
                         argv=[__file__, *(sys.argv[1:] if argv is None else argv)])
    for seed in args.seeds:
        for alpha in args.alphas:
            for name, experiment, overrides in runs:
                run_or_reuse(record, f"alpha{alpha:g}/{name}/seed{seed}", experiment,
                             [*args.set, *overrides, f"data.params.alpha={alpha}", f"seed={seed}"],
                             args.out / f"alpha{alpha:g}" / name / f"seed{seed}")
    per_alpha = {alpha: {name: {int(d.name[4:]): m for d in sorted((args.out / f"alpha{alpha:g}" / name).glob("seed*"))
                                if (m := finished_metrics(d)) is not None} for name, _, _ in runs}
                 for alpha in args.alphas}
    rows, summary = table_rows(per_alpha)
    update_metrics_file(args.out / "metrics.json", summary)
    path = record.write(args.out, columns(args.alphas), rows)
    from render_results import render_table
    print(render_table(json.loads(path.read_text())))
    print(f"record: {path}")
    return path


if __name__ == "__main__":
    main()
