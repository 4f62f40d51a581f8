"""Unadversarial examples on the embedded digits (thesis 001 ch. 3, Figs. 3.3–3.5; issue #50): do per-class patterns
trained for a fixed classifier make it more accurate clean and under common corruptions, and which does the model
follow when the pattern of another class is put on the object?

The fixed model: ``digits_classifier`` trained 4 epochs without shift augmentation (full precision). On it,
``unadversarial_digits`` trains per-class textures on the digits' stroke pixels and, separately, 7×7 corner patches
(6 % of the area); each run tests its pattern beside no pattern, a random pattern and the best training image of each
class in the same carrier, on the 1,000 test digits, clean and under seven common corruptions at severities 1–5.
Runs land in ``<out>/classifier_seed<s>/`` and ``<out>/<carrier>_seed<s>/`` and are reused when finished; the record
is ``<out>/unadversarial_digits.json`` (``benchmarks/records.py``); ``python benchmarks/render_results.py --results
docs/perturbations.md`` puts it into the docs.

    python benchmarks/unadversarial_table.py --out outputs/unadversarial_table [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import json
import statistics

from records import ROOT, TableRecord, recorded_runs

DEPENDS_ON = ["lit_robust/models/unadversarial.py", "lit_robust/functional/unadversarial_patterns.py",
              "lit_robust/functional/shifts.py", "lit_robust/models/classifier.py", "datamodules/digits.py",
              "conf/experiment/unadversarial_digits.yaml", "conf/experiment/digits_classifier.yaml"]
CARRIERS = ("texture", "patch")
VARIANTS = {"none": "none", "random": "random", "best_image": "best training image", "unadversarial": "unadversarial"}
CLASSIFIER = ["experiment=digits_classifier", "trainer.max_epochs=4", "model.max_shift=0", "trainer.precision=32-true"]
# the probe's cells (issue #50) beside the means over the seven corruptions
CELLS = {"clean": "clean", **{f"corrupted_s{s}": f"corrupted_s{s}" for s in range(1, 6)},
         "noise_s3": "gaussian_noise_s3", "blur_s5": "gaussian_blur_s5", "contrast_s5": "contrast_s5",
         "follows_pattern": "conflict_follows_pattern", "follows_image": "conflict_follows_image"}
COLUMNS = [("carrier", "{carrier}"), ("pattern", "{pattern}"), ("clean (%)", "{clean:.1f}"),
           *[(f"corrupted s{s} (%)", f"{{corrupted_s{s}:.1f}}") for s in range(1, 6)],
           ("noise s3 (%)", "{noise_s3:.1f}"), ("blur s5 (%)", "{blur_s5:.1f}"),
           ("contrast s5 (%)", "{contrast_s5:.1f}"),
           ("conflict: follows pattern / image (%)", "{follows_pattern:.1f} / {follows_image:.1f}"),
           ("seeds", "{seeds}")]


def row_of(carrier: str, variant: str, per_seed: list[dict], seeds: list[int]) -> dict:
    """Means over seeds, in %, of one carrier's variant ("–" cells where a variant has no conflict test)."""
    row = {"name": f"{carrier}/{variant}", "carrier": carrier, "pattern": VARIANTS[variant],
           "seeds": ", ".join(map(str, seeds))}
    for cell, key in CELLS.items():
        values = [m[f"test/{variant}/{key}"] for m in per_seed if f"test/{variant}/{key}" in m]
        if values:
            row[cell] = 100 * statistics.mean(values)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/unadversarial_table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args, extra = parser.parse_known_args()
    out = (ROOT / args.out).resolve()
    record = TableRecord("unadversarial_digits", depends_on=DEPENDS_ON,
                         title="Unadversarial textures and patches, MNIST digits")
    results = {carrier: [] for carrier in CARRIERS}
    for seed in args.seeds:
        classifier = out / f"classifier_seed{seed}"
        runs = [(classifier, [*CLASSIFIER, f"seed={seed}"], "test/acc")]
        runs += [(out / f"{carrier}_seed{seed}", ["experiment=unadversarial_digits", f"model.carrier={carrier}",
                                                  f"model.classifier_path={classifier / 'checkpoints' / 'best.ckpt'}",
                                                  f"seed={seed}", *extra], "test/unadversarial/clean")
                 for carrier in CARRIERS]
        finished = recorded_runs(record, runs)
        if finished is None:
            return
        for carrier, metrics in zip(CARRIERS, finished[1:]):
            results[carrier].append(metrics)
    rows = [row_of(carrier, variant, results[carrier], args.seeds) for carrier in CARRIERS for variant in VARIANTS]
    path = record.write(out, COLUMNS, rows)
    from render_results import render_table
    print(render_table(json.loads(path.read_text())))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
