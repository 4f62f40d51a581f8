"""Robust-feature transfer on embedded data (thesis 001 ch. 2, Figs. 2.2–2.3; issue #32): does a source model
trained adversarially transfer better than a standard one?

Sources: the small CNN of ``adv_train_digits`` in its first recipe (``records.first_adversarial_recipe``: 8-16-32
channels, 5 training PGD steps, ε warmed up over 2 of 10 epochs, batches of 128, best clean-val checkpoint; pinned
since that experiment was retuned for issue 32, so these runs and their record are unchanged) on the MNIST digits,
trained standard (ε = 0: the same network and schedule without the attack) and with PGD-AT at ℓ∞ ε ∈ ``--eps``; the robust ones
report PGD-20 accuracy at their own ε (200 test images). Target: ``robust_transfer_digits`` — scikit-learn's 8×8
digits at 28×28, a linear head on the frozen features and the whole network fine-tuned. Every (ε, seed) trains its
own source; rows give mean ± std over ``--seeds``. Runs land in ``<out>/source_eps<ε>_seed<s>/`` and
``<out>/<mode>_eps<ε>_seed<s>/`` and are reused when finished. Written to ``<out>/robust_transfer_digits.json``
(``benchmarks/records.py``); ``benchmarks/render_results.py`` puts it into ``docs/results.md``.

    python benchmarks/robust_transfer_table.py --out outputs/robust_transfer_table [--seeds 0 1 2] [--eps 0 0.1 0.3]
"""
from __future__ import annotations

import argparse
import json
import statistics

from records import ROOT, TableRecord, first_adversarial_recipe, read_hydra_config, train_run

MODES = ("linear", "finetune")
# ε = 0: adv_train_digits' network, optimiser and schedule without the attack
STANDARD = ["experiment=digits_classifier", "model.backbone_kwargs={widths:[8,16,32]}", "model.max_shift=0",
            "trainer.max_epochs=10", "trainer.precision=32-true"]
# adv_train_digits' recipe before issue 32's retuning (16-32-64, 10 steps, 15 epochs, batches of 32, last epoch), so
# that these sources, and docs/records/robust_transfer_digits.json, stay as they were measured
COLUMNS = [("source ε (ℓ∞)", "{eps:g}"), ("source clean (%)", "{source_acc_mean:.1f} ± {source_acc_std:.1f}"),
           ("source PGD-20 at ε (%)", "{source_pgd}"),
           ("fixed-feature transfer (%)", "{linear_mean:.1f} ± {linear_std:.1f}"),
           ("full-network transfer (%)", "{finetune_mean:.1f} ± {finetune_std:.1f}"), ("seeds", "{seeds}")]

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/models/adversarial.py",
              "lit_robust/models/transfer_classifier.py",
              "lit_robust/functional/attacks.py",
              "conf/experiment/robust_transfer_digits.yaml",
              "conf/experiment/adv_train_digits.yaml",
              "conf/experiment/digits_classifier.yaml"]


def source_overrides(eps: float) -> list[str]:
    if eps == 0:
        return STANDARD
    return ["experiment=adv_train_digits", *first_adversarial_recipe(), f"model.eps={eps}",
            f"callbacks.adversarial_evaluation.epsilons=[{eps}]", "callbacks.adversarial_evaluation.num_images=200",
            "callbacks.adversarial_evaluation.attacks=[pgd]", "callbacks.adversarial_evaluation.masking_eps=null"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return 100 * statistics.mean(values), 100 * (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/robust_transfer_table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    args, extra = parser.parse_known_args()
    out = (ROOT / args.out).resolve()
    record = TableRecord("robust_transfer_digits", depends_on=DEPENDS_ON,
                         title="Robust-feature transfer, MNIST digits → 8×8 digits")
    rows = []
    for eps in args.eps:
        results = {"source": [], "pgd": [], "linear": [], "finetune": []}
        for seed in args.seeds:
            source = out / f"source_eps{eps:g}_seed{seed}"
            metrics, provenance = train_run(source, [*source_overrides(eps), f"seed={seed}", *extra])
            if not metrics:
                print(f"{source} is not finished: no table written")
                return
            record.add_run(source.name, run_dir=str(source), **provenance)
            record.add_config(source.name, read_hydra_config(source))
            results["source"].append(metrics["test/acc"])
            if eps > 0:
                results["pgd"].append(metrics[f"adv/test/eps{eps:g}/pgd"])
            for mode in MODES:
                target = out / f"{mode}_eps{eps:g}_seed{seed}"
                metrics, provenance = train_run(target, [
                    "experiment=robust_transfer_digits", f"model.mode={mode}", f"seed={seed}",
                    f"model.weights_path={source / 'checkpoints' / 'best.ckpt'}", *extra])
                if not metrics:
                    print(f"{target} is not finished: no table written")
                    return
                record.add_run(target.name, run_dir=str(target), **provenance)
                record.add_config(target.name, read_hydra_config(target))
                results[mode].append(metrics["test/acc"])
        row = {"eps": eps, "seeds": ", ".join(map(str, args.seeds)),
               "source_pgd": "–" if eps == 0 else "{:.1f} ± {:.1f}".format(*mean_std(results["pgd"]))}
        for key, name in (("source", "source_acc"), ("linear", "linear"), ("finetune", "finetune")):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(results[key])
            row[f"{name}_per_seed"] = results[key]
        row["source_pgd_per_seed"] = results["pgd"]
        rows.append(row)
    path = record.write(out, COLUMNS, rows)
    from render_results import render_table
    print(render_table(json.loads(path.read_text())))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
