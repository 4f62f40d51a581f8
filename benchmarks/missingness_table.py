"""Missingness bias on the embedded digits (thesis 001 ch. 5, Figs. 5.3–5.5; issue #31): a small CNN with its
regions blacked out, the same CNN trained with missingness augmentation (half of the 4×4 regions blacked out per
training image, the chapter's recipe), and a ViT (patch 4, so a region is a token) with its tokens dropped and, for
reference, blacked out — all removing the same regions in the same order, the standard CNN's gradient saliency
(the chapter uses one standard ResNet's saliency for every model).

Rows: model × removal order; columns: clean accuracy, the share of test predictions unchanged when 25 % and 50 % of
the regions are removed, and the entropy of the predicted-class distribution at 50 % (nats; ln 10 = 2.30 is
uniform). Written to ``<out>/missingness_digits.json`` (``benchmarks/records.py``);
``benchmarks/render_results.py`` puts it into ``docs/results.md``; each run's plots are in
``<out>/<run>/missingness/``. Extra arguments are Hydra overrides for every run. About 6 min on 2 cores.

    python benchmarks/missingness_table.py --out outputs/missingness_table
"""
from __future__ import annotations

import json

from records import TableRecord, read_hydra_config, table_arguments, train_run

RUNS = {"cnn": ["experiment=missingness_digits"],
        "cnn_augmented": ["experiment=missingness_digits", "model.missingness_fraction=0.5"],
        "vit": ["experiment=missingness_vit_digits"]}
ROWS = [("cnn", "blackout", "CNN, black-out"), ("cnn_augmented", "blackout", "CNN + missingness augmentation, black-out"),
        ("vit", "drop_tokens", "ViT, dropped tokens"), ("vit", "blackout", "ViT, black-out")]
ORDERS = ("least_salient", "random", "most_salient")
COLUMNS = [("model, missingness", "{label}"), ("order", "{order}"), ("clean acc (%)", "{acc:.1f}"),
           ("unchanged at 25 % (%)", "{unchanged_f25:.1f}"), ("unchanged at 50 % (%)", "{unchanged_f50:.1f}"),
           ("entropy at 50 % (nats)", "{entropy_f50:.2f}")]

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/functional/missingness_bias.py",
              "callbacks/missingness.py",
              "lit_robust/models/smoothed_vit.py",
              "conf/experiment/missingness_digits.yaml",
              "conf/experiment/missingness_vit_digits.yaml",
              "conf/callbacks/missingness.yaml"]


def main() -> None:
    args, extra, out = table_arguments(__doc__, "outputs/missingness_table", RUNS)
    record = TableRecord("missingness_digits", depends_on=DEPENDS_ON,
                         title="Missingness bias on digits (test split, 4×4 regions)")
    saliency = f"callbacks.missingness.saliency_checkpoint={out / 'cnn' / 'checkpoints' / 'best.ckpt'}"
    metrics = {}
    for name in ["cnn", *[n for n in args.only if n != "cnn"]]:  # the others take the standard CNN's order
        overrides = [*RUNS[name], *([saliency] if name != "cnn" else []), *extra]
        metrics[name], provenance = train_run(out / name, overrides)
        if not metrics[name]:
            print(f"{name} is not finished: no table written")
            return
        record.add_run(name, run_dir=str(out / name), **provenance)
        record.add_config(name, read_hydra_config(out / name))
    rows = []
    for name, mode, label in ROWS:
        if name not in metrics:
            continue
        for order in ORDERS:
            tag = f"missing/test/{mode}/{order}"
            rows.append({"name": name, "mode": mode, "label": label, "order": order.replace("_", " "),
                         "acc": 100 * metrics[name][f"missing/test/{mode}/acc"],
                         **{key: (100 if key.startswith("unchanged") else 1) * metrics[name][f"{tag}/{key}"]
                            for key in ("unchanged_f25", "unchanged_f50", "entropy_f50")}})
    path = record.write(out, COLUMNS, rows)
    from render_results import render_table
    print(render_table(json.loads(path.read_text())))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
