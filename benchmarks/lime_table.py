"""LIME under missingness on the embedded digits (thesis 001 §5.3, Figs. 5.8–5.10; issue #31): the models of
``missingness_table.py`` (a small CNN with black-out, the same CNN with missingness augmentation, a ViT with patch 4
whose tokens are dropped), plus a second seed of the CNN, each explained by LIME (``MissingnessReport(lime_samples=
100, lime_images=100)``: the first 100 test images, the same 100 perturbations for every model — the chapter uses
1,000 and a second ViT seed too; both cut to fit a 2-core CPU, where LIME is 8 × 100 × 100 forward passes per model).

Two tables, both with 4×4 regions (64 per image):

- ``lime_consistency_digits`` (Fig. 5.8): the mean top-k Jaccard similarity of black-out explanations made with
  eight grey levels as the baseline colour (28 pairs), for k = 10 / 25 / 50 % of the regions; random explanations
  as the floor. The ViT with dropped tokens needs no colour, so its explanations agree by construction (1).
- ``lime_topk_digits`` (Figs. 5.9–5.10): the top-k ablation test — the share of predictions unchanged after the
  top 10 / 25 / 50 % regions of an explanation are removed with the model's own missingness — for the model's own
  explanation, the CNN's other seed, the other architecture and random scores. Lower is a better explanation;
  the chapter's point is whether they are told apart at all.

The runs go into ``--out``: training runs first (each saves its explanations, ``<run>/missingness/test_lime.pt``),
then the standard CNN is tested again (``evaluate.py``) with the ViT's and its other seed's explanations, which
exist only after their runs. About 28 min on one core. Written to ``<out>/lime_consistency_digits.json`` and
``<out>/lime_topk_digits.json`` (``benchmarks/records.py``); ``benchmarks/render_results.py`` puts them into
``docs/results.md``. Extra arguments are Hydra overrides for every run.

    python benchmarks/lime_table.py --out outputs/lime_table
"""
from __future__ import annotations

import json
from pathlib import Path

from records import TableRecord, read_hydra_config, table_arguments, train_run

LIME = ["callbacks.missingness.lime_samples=100", "callbacks.missingness.lime_images=100",
        "callbacks.missingness.orders=[random]"]
CNN, VIT = "experiment=missingness_digits", "experiment=missingness_vit_digits"
NO_COLOURS = "callbacks.missingness.lime_consistency=false"  # black-out LIME with black only, no colour consistency

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/functional/lime.py",
              "lit_robust/functional/missingness_bias.py",
              "callbacks/missingness.py",
              "lit_robust/models/smoothed_vit.py",
              "conf/experiment/missingness_digits.yaml",
              "conf/experiment/missingness_vit_digits.yaml",
              "conf/callbacks/missingness.yaml"]


def explanations(out: Path, **runs: str) -> str:
    """The override giving MissingnessReport other runs' explanations, ``{name: <out>/<run>/.../test_lime.pt}``."""
    pairs = ",".join(f"{name}:'{out / run / 'missingness' / 'test_lime.pt'}'" for name, run in runs.items())
    return f"callbacks.missingness.lime_explanations={{{pairs}}}"


def runs(out: Path) -> dict[str, tuple[str, list[str]]]:
    """Run name → (script, overrides), in the order they must run."""
    return {
        "cnn": ("train.py", [CNN, *LIME]),
        "cnn_seed1": ("train.py", [CNN, "seed=1", *LIME, NO_COLOURS]),
        "vit": ("train.py", [VIT, *LIME, explanations(out, cnn="cnn")]),
        "cnn_augmented": ("train.py", [CNN, "model.missingness_fraction=0.5", *LIME, NO_COLOURS,
                                       explanations(out, standard_cnn="cnn", vit="vit")]),
        "cnn_tested": ("evaluate.py", [CNN, f"ckpt_path='{out / 'cnn' / 'checkpoints' / 'best.ckpt'}'", *LIME,
                                       NO_COLOURS, explanations(out, seed="cnn_seed1", vit="vit")]),
    }


# (run, its missingness, label, [(source, label)]) of the top-k table
TOPK_ROWS = [("cnn_tested", "blackout", "CNN, black-out",
              [("own", "own"), ("seed", "CNN, other seed"), ("vit", "ViT"), ("random", "random")]),
             ("vit", "drop_tokens", "ViT, dropped tokens",
              [("own", "own"), ("cnn", "CNN"), ("random", "random")]),
             ("cnn_augmented", "blackout", "CNN + missingness augmentation, black-out",
              [("own", "own"), ("standard_cnn", "standard CNN"), ("vit", "ViT"), ("random", "random")])]
CONSISTENCY_ROWS = [("cnn", "missing/test/blackout/lime/consistency", "CNN, black-out"),
                    ("vit", "missing/test/blackout/lime/consistency", "ViT, black-out (pixels)"),
                    ("cnn", "missing/test/lime/random_consistency", "random explanations")]
PERCENTS = (10, 25, 50)
TOPK_COLUMNS = [("model, missingness", "{label}"), ("explanation", "{source}"), ("clean acc (%)", "{acc:.1f}"),
                *[(f"unchanged, top {p} % removed (%)", f"{{f{p}:.1f}}") for p in PERCENTS]]
CONSISTENCY_COLUMNS = [("model, missingness", "{label}"),
                       *[(f"top-k Jaccard, k = {p} %", f"{{f{p}:.3f}}") for p in PERCENTS]]


def main() -> None:
    args, extra, out = table_arguments(__doc__, "outputs/lime_table", runs(Path("outputs/lime_table")))
    metrics, records = {}, {name: TableRecord(name, depends_on=DEPENDS_ON, title=title) for name, title in (
        ("lime_consistency_digits", "LIME consistency across baseline colours on digits (test split, 4×4 regions)"),
        ("lime_topk_digits", "Top-k ablation test of LIME explanations on digits (test split, 4×4 regions)"))}
    for name, (script, overrides) in runs(out).items():
        metrics[name], provenance = train_run(out / name, [*overrides, *extra], script=script)
        if not metrics[name]:
            print(f"{name} is not finished: no table written")
            return
        for record in records.values():
            record.add_run(name, run_dir=str(out / name), script=script, **provenance)
            record.add_config(name, read_hydra_config(out / name))
    topk = []
    for run, mode, label, sources in TOPK_ROWS:
        for source, source_label in sources:
            tag = f"missing/test/{mode}/lime_{source}"
            topk.append({"label": label, "source": source_label, "acc": 100 * metrics[run][f"missing/test/{mode}/acc"],
                         **{f"f{p}": 100 * metrics[run][f"{tag}/unchanged_f{p}"] for p in PERCENTS}})
    consistency = [{"label": label, **{f"f{p}": metrics[run][f"{key}_f{p}"] for p in PERCENTS}}
                   for run, key, label in CONSISTENCY_ROWS]
    from render_results import render_table
    for name, columns, rows in (("lime_consistency_digits", CONSISTENCY_COLUMNS, consistency),
                                ("lime_topk_digits", TOPK_COLUMNS, topk)):
        path = records[name].write(out, columns, rows)
        print(render_table(json.loads(path.read_text())))
        print(f"record: {path}")


if __name__ == "__main__":
    main()
