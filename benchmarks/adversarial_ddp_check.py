"""Adversarial training under DDP (issue #32): ``adv_train_digits`` (PGD-AT, ℓ∞ ε = 0.3) in its first recipe
(``records.first_adversarial_recipe``: 8-16-32 channels, 5 attack steps, 10 epochs, batches of 128) trained in one
process and in two gloo processes (``trainer=ddp_cpu``, each rank attacking its own batch) with the same seed,
beside a second seed in one process as the measure of run-to-run noise; each model evaluated by
``AdversarialEvaluation`` on all 1,000 test images at ε = 0.3 (PGD-20, APGD-CE, APGD-T on APGD-CE's survivors).

Under DDP the global batch is 2 × ``data.batch_size`` and an epoch has half the steps, as Lightning runs any
multi-process fit; the last run halves the per-rank batch (64) so that both the global batch (128) and the number
of optimiser steps equal the 1-process run's. The check is that the 2-process model is as robust as the 1-process
ones, within the spread of the two seeds. Written to ``<out>/adversarial_ddp.json`` (``benchmarks/records.py``);
extra arguments are Hydra overrides for every run.

    OMP_NUM_THREADS=1 python benchmarks/adversarial_ddp_check.py --out outputs/adversarial_ddp
"""
from __future__ import annotations

import json

from records import TableRecord, first_adversarial_recipe, read_hydra_config, table_arguments, train_run

EVALUATION = ["experiment=adv_train_digits", "callbacks.adversarial_evaluation.epsilons=[0.3]",
              "callbacks.adversarial_evaluation.num_images=null", "callbacks.adversarial_evaluation.masking_eps=null"]
# the first recipe, pinned (a cheap one; the check is about DDP, not the recipe)
RUNS = {"1 process, seed 0": [*EVALUATION, *first_adversarial_recipe(), "seed=0"],
        "2 processes, seed 0": [*EVALUATION, *first_adversarial_recipe(), "seed=0", "trainer=ddp_cpu"],
        "1 process, seed 1": [*EVALUATION, *first_adversarial_recipe(), "seed=1"],
        "2 processes, seed 0, 64 per rank": [*EVALUATION, *first_adversarial_recipe(64), "seed=0", "trainer=ddp_cpu"]}
COLUMNS = [("run", "{name}"), ("test images", "{images}"), ("clean (%)", "{clean:.1f}"), ("PGD-20 (%)", "{pgd:.1f}"),
           ("APGD-CE+T (%)", "{apgd_both:.1f}"), ("all three (%)", "{robust:.1f}"), ("minutes", "{minutes:.1f}")]

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/models/adversarial.py",
              "lit_robust/functional/attacks.py",
              "callbacks/adversarial_evaluation.py",
              "conf/experiment/adv_train_digits.yaml",
              "conf/model/adversarial.yaml",
              "conf/callbacks/adversarial.yaml",
              "conf/trainer/ddp_cpu.yaml"]


def main() -> None:
    args, extra, out = table_arguments(__doc__, "outputs/adversarial_ddp", RUNS)
    record = TableRecord("adversarial_ddp", depends_on=DEPENDS_ON,
                         title="PGD-AT on digits in 1 and 2 DDP processes (ε = 0.3, test split)")
    rows = []
    for name in args.only:
        run_dir = out / name.replace(" ", "_").replace(",", "")
        metrics, provenance = train_run(run_dir, [*RUNS[name], *extra])
        if not metrics:
            print(f"{name} is not finished: no table written")
            return
        record.add_run(name, run_dir=str(run_dir), **provenance)
        record.add_config(name, read_hydra_config(run_dir))
        images = json.loads((run_dir / "adversarial" / "test_records.json").read_text())["images"]
        share = lambda test: 100.0 * sum(map(test, images)) / len(images)  # noqa: E731
        rows.append({"name": name, "images": len(images), "clean": share(lambda r: r["clean"]),
                     "pgd": share(lambda r: r["eps0.3/pgd"]),
                     "apgd_both": share(lambda r: r["eps0.3/apgd-ce"] and r["eps0.3/apgd-t"]),
                     "robust": share(lambda r: r["eps0.3/robust"]), "minutes": provenance.get("seconds", 0) / 60})
    path = record.write(out, COLUMNS, rows)
    from render_results import render_table
    print(render_table(json.loads(path.read_text())))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
