"""Bias transfer (Salman 2023 ch. 7, App. G; issue 50): does a bias planted in a source model reach a target task
whose data never shows it, and what removes it?

Sources (``bias_source_digits``: the 32-64 small CNN, 8 epochs on the 3,500 MNIST training digits): clean (the
trigger planted on 0 % of the 7s), planted (a white 3×3 patch in the bottom-right corner on each of ``--fractions``
of the 7s, labels kept) and BadNets (the same patch on 10 % of the 1s, relabelled 7). Targets
(``bias_transfer_digits``: scikit-learn's 8×8 digits at 28×28, labels mod 5, SGD): fixed-feature (the extractor's
weights frozen, its BatchNorm statistics following the target data, as the thesis) and full-network transfer, each
with the config's weight decay × ``--wd-multipliers`` and, at ×1, de-biased (the trigger on ``--debias-fractions`` of
the target training images, labels kept). Every row gives, per (source, transfer, target setting): the source's own
Eq. 7.1 ASR on its test digits, the target's clean accuracy, its Eq. 7.1 ASR on the clean target test set
(Pr[C(T(x)) ≠ y | C(x) = y]) and the gap to the clean source's under the same transfer and seed — mean ± std over
``--seeds``, with the per-seed values (percent, points) in the record. Runs land in ``<out>/source_<source>_seed<s>/``
and ``<out>/<source>_<mode>_<setting>_seed<s>/`` and are reused when finished; extra arguments, before the list
options, are Hydra overrides for every run. Written to ``<out>/bias_transfer_digits.json`` (``benchmarks/records.py``); copied to ``docs/records/``,
``benchmarks/render_results.py --results docs/perturbations.md`` renders it.

    python benchmarks/bias_transfer_table.py --out outputs/bias_transfer_table [overrides] [--seeds 0 1 2]
        [--fractions 0.5 1] [--wd-multipliers 1 10 100] [--debias-fractions 0.5]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from records import ROOT, TableRecord, recorded_runs

MODES = {"linear": "fixed-feature", "finetune": "full-network"}
ASR, SOURCE_EXPERIMENT, TARGET_EXPERIMENT = "poison/bias_asr_x1", "bias_source_digits", "bias_transfer_digits"
# BadNets' dirty label beside the planted bias: the planted trigger (its corner at 28×28) on 10 % of the 1s, as 7s
BADNETS = ["data.attack=badnets", "data.params.source_class=1", "+data.params.target_class=7",
           "data.params.fraction=0.1", "data.params.position=[25,25]"]
COLUMNS = [("source", "{source}"), ("transfer", "{transfer}"), ("target setting", "{setting}"),
           ("source ASR (%)", "{source_asr_mean:.1f} ± {source_asr_std:.1f}"),
           ("target accuracy (%)", "{acc_mean:.1f} ± {acc_std:.1f}"),
           ("target ASR (%)", "{asr_mean:.1f} ± {asr_std:.1f}"),
           ("ASR gap to clean source (points)", "{gap_mean:+.1f} ± {gap_std:.1f}"), ("seeds", "{seeds}")]

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/functional/bias_transfer.py",
              "lit_robust/poisons/planted.py",
              "lit_robust/poisons/badnets.py",
              "lit_robust/models/transfer_classifier.py",
              "lit_robust/models/classifier.py",
              "datamodules/relabelled.py",
              "datamodules/poisoned.py",
              "callbacks/poison_metrics.py",
              "callbacks/metric_eval.py",
              "conf/data/poisoned_digits.yaml",
              "conf/data/poisoned_digits_mod5.yaml",
              f"conf/experiment/{SOURCE_EXPERIMENT}.yaml",
              f"conf/experiment/{TARGET_EXPERIMENT}.yaml"]


def sources(fractions: list[float]) -> dict[str, tuple[str, list[str]]]:
    """Source name → (its label, its overrides of ``bias_source_digits``): clean, planted at each fraction, BadNets."""
    named = {"clean": ("clean", ["data.params.fraction=0"])}
    for fraction in fractions:
        named[f"planted{100 * fraction:g}"] = (f"planted, {100 * fraction:g} % of the 7s",
                                               [f"data.params.fraction={fraction}"])
    named["badnets"] = ("BadNets, 10 % of the 1s → 7", BADNETS)
    return named


def target_settings(wd_multipliers: list[float], debias_fractions: list[float],
                    weight_decay: float) -> dict[str, tuple[str, list[str]]]:
    """Setting name → (its label, its overrides of ``bias_transfer_digits``): the weight decay × each multiplier, and
    de-biasing at each fraction with the config's weight decay."""
    named = {f"wd{m:g}": (f"weight decay ×{m:g}", [f"model.weight_decay={weight_decay * m:g}"])
             for m in wd_multipliers}
    for fraction in debias_fractions:
        named[f"debias{100 * fraction:g}"] = (f"de-biased, {100 * fraction:g} %", [f"data.params.fraction={fraction}"])
    return named


def summary(name: str, values: list[float]) -> dict:
    """``<name>_mean``, ``<name>_std`` (sample; 0 for one value) and ``<name>_per_seed``."""
    return {f"{name}_mean": statistics.mean(values), f"{name}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            f"{name}_per_seed": values}


def table_rows(source_metrics: dict[str, list[dict]], target_metrics: dict[tuple[str, str, str], list[dict]],
               labels: dict[str, str], seeds: list[int]) -> list[dict]:
    """One row per (transfer, target setting, source), in percent: ``source_metrics[source]`` and
    ``target_metrics[(source, mode, setting)]`` hold one run's metrics per seed, in the order of ``seeds``; the gap
    is each seed's target ASR minus the clean source's under the same transfer, setting and seed."""
    rows = []
    for source, mode, setting in target_metrics:
        targets, clean = target_metrics[(source, mode, setting)], target_metrics[("clean", mode, setting)]
        asr = [100 * m[ASR] for m in targets]
        rows.append({"source": labels[source], "transfer": MODES[mode], "setting": labels[setting],
                     "seeds": ", ".join(map(str, seeds)),
                     **summary("source_asr", [100 * m[ASR] for m in source_metrics[source]]),
                     **summary("acc", [100 * m["test/acc"] for m in targets]), **summary("asr", asr),
                     **summary("gap", [value - 100 * m[ASR] for value, m in zip(asr, clean)])})
    return rows


def run_all(out: Path, args, extra: list[str], record: TableRecord):
    """Train every source and transfer it under every mode and setting, per seed; the metrics (``table_rows``'
    arguments) or None when a run is not finished."""
    from omegaconf import OmegaConf

    weight_decay = OmegaConf.load(ROOT / "conf" / "experiment" / f"{TARGET_EXPERIMENT}.yaml").model.weight_decay
    named_sources = sources(args.fractions)
    settings = target_settings(args.wd_multipliers, args.debias_fractions, weight_decay)
    source_metrics, target_metrics = {}, {}
    for source, (_, source_overrides) in named_sources.items():
        for seed in args.seeds:
            source_dir = out / f"source_{source}_seed{seed}"
            done = recorded_runs(record, [(source_dir, [f"experiment={SOURCE_EXPERIMENT}", *source_overrides,
                                                        f"seed={seed}", *extra], "test/acc")])
            if done is None:
                return None
            source_metrics.setdefault(source, []).extend(done)
            weights = source_dir / "checkpoints" / "best.ckpt"
            for mode in MODES:
                for setting, (_, overrides) in settings.items():
                    done = recorded_runs(record, [(out / f"{source}_{mode}_{setting}_seed{seed}", [
                        f"experiment={TARGET_EXPERIMENT}", f"model.mode={mode}", f"model.weights_path={weights}",
                        *overrides, f"seed={seed}", *extra], "test/acc")])
                    if done is None:
                        return None
                    target_metrics.setdefault((source, mode, setting), []).extend(done)
    labels = {name: label for name, (label, _) in {**named_sources, **settings}.items()}
    ordered = {key: target_metrics[key] for key in sorted(target_metrics, key=lambda k: (
        list(MODES).index(k[1]), list(settings).index(k[2]), list(named_sources).index(k[0])))}
    return source_metrics, ordered, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/bias_transfer_table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0],
                        help="fractions of the source's 7s that carry the planted trigger (the clean source is 0)")
    parser.add_argument("--wd-multipliers", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument("--debias-fractions", type=float, nargs="*", default=[0.5])
    args, extra = parser.parse_known_args()
    bad = [f for f in [*args.fractions, *args.debias_fractions] if not 0 < f <= 1] + [
        m for m in args.wd_multipliers if not (m >= 0 and math.isfinite(m))]
    if bad:
        raise SystemExit(f"{bad}: fractions must be in (0, 1] (the clean source is always run) and weight-decay "
                         "multipliers finite and ≥ 0")
    out = (ROOT / args.out).resolve()
    record = TableRecord("bias_transfer_digits", depends_on=DEPENDS_ON,
                         title="Bias transfer, MNIST digits → 8×8 digits mod 5")
    results = run_all(out, args, extra, record)
    if results is None:
        return
    path = record.write(out, COLUMNS, table_rows(*results, args.seeds))
    from render_results import render_table
    print(render_table(json.loads(path.read_text())))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
