"""PatchCleanser against derandomized smoothing on the digits test split (issue #31), and the throughput of the
batched certification against a bare loop over the same masked forward passes.

Table ``patchcleanser_digits``: PatchCleanser's clean (Algorithm 1) and certified (Theorem 1) accuracy at m = 2 and 4
from a finished ``patchcleanser_digits`` run (``--run``; its ``metrics.json``), beside derandomized smoothing's
smoothed and certified accuracy **cited** from ``docs/results.md`` ("Smoothed ViT", digits table; those checkpoints
are not kept, and retraining the ViT takes ≈ 65 min here). Certification time per image is measured in this script
for every row, interleaved (``benchmarks/timing.py``) on the first ``--images`` test images: PatchCleanser with the
run's weights, derandomized smoothing with untrained models built from the ``smoothed_vit_digits`` /
``smoothed_cnn_digits`` configs (the time does not depend on the weights; the same 32 column ablations, token
dropping for the ViT).

Table ``patchcleanser_throughput``: ``patchcleanser_outcomes`` (table, Algorithm 1, Theorem 1) against a bare loop
running the same stacked masked batches through the network and taking the argmax, and a naive loop over mask pairs.

    OMP_NUM_THREADS=1 python benchmarks/patchcleanser_table.py --run outputs/pc_digits --out docs/records
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from records import TableRecord, read_hydra_config
from timing import interleaved, print_table

from lit_robust.functional.derandomized_smoothing import certified, patch_delta, smoothed_prediction
from lit_robust.functional.double_masking import mask_pairs, mask_set, patchcleanser_outcomes
from lit_robust.models.smoothed_classifier import SmoothedClassifier
from lit_robust.storage.serialization import load_plain

ROOT = Path(__file__).resolve().parents[1]
PATCHES = (2, 4)
CITED = {  # docs/results.md, "Smoothed ViT" → "Digits: smoothed and certified accuracy on the test split (360 images)"
    "ds_vit": {"label": "derandomized smoothing, ViT 96/4 (0.46 M), two-stage, token dropping [cited]",
               "experiment": "smoothed_vit_digits", "clean_m2": 90.3, "clean_m4": 90.3, "cert_m2": 65.8,
               "cert_m4": 48.9},
    "ds_cnn": {"label": "derandomized smoothing, small CNN 16-32-64 (0.07 M) [cited]",
               "experiment": "smoothed_cnn_digits", "clean_m2": 91.4, "clean_m4": 91.4, "cert_m2": 56.9,
               "cert_m4": 37.2}}
COLUMNS = [("defence", "{label}"), ("clean m=2 (%)", "{clean_m2:.1f}"), ("certified 2×2 (%)", "{cert_m2:.1f}"),
           ("clean m=4 (%)", "{clean_m4:.1f}"), ("certified 4×4 (%)", "{cert_m4:.1f}"),
           ("s/image m=2", "{seconds_m2:.3f}"), ("s/image m=4", "{seconds_m4:.3f}")]
THROUGHPUT_COLUMNS = [("path", "{name}"), ("images/s", "{throughput:.2f}"), ("× bare loop", "{ratio_to_reference:.2f}"),
                      ("min s", "{wall_min:.2f}"), ("median s", "{wall_median:.2f}")]

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/functional/double_masking.py",
              "lit_robust/functional/derandomized_smoothing.py",
              "lit_robust/models/smoothed_classifier.py",
              "callbacks/patchcleanser.py",
              "lit_robust/machine.py",
              "conf/experiment/patchcleanser_digits.yaml",
              "conf/experiment/smoothed_vit_digits.yaml",
              "conf/experiment/smoothed_cnn_digits.yaml"]


def compose_experiment(experiment: str, part: str = "model"):
    """The experiment's model (untrained, eval mode) or data module, built from its config."""
    import hydra
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from lit_robust.run import runner
    GlobalHydra.instance().clear()
    with initialize_config_module(runner.CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "output_dir=unused"])
    torch.manual_seed(0)
    built = hydra.utils.instantiate(cfg[part], _convert_="all")
    return built.eval() if part == "model" else built


def test_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images of the experiment's test split (the 360 the table's accuracies are on)."""
    data = compose_experiment("patchcleanser_digits", "data")
    data.setup("test")
    loader = data.test_dataloader()
    images, targets = next(iter(torch.utils.data.DataLoader(loader.dataset, batch_size=count)))
    return images, targets


def trained_classifier(run_dir: Path):
    model = compose_experiment("patchcleanser_digits")
    checkpoint = run_dir / "checkpoints" / "best.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} is missing: run train.py experiment=patchcleanser_digits "
                                f"hydra.run.dir={run_dir} first")
    model.load_state_dict(load_plain(checkpoint, "checkpoint")["state_dict"])
    return model


def discarding(function, *args):
    """A timing case: ``function(*args)``, its result dropped (``interleaved`` counts a returned number as seconds)."""
    def case() -> None:
        function(*args)
    return case


def timing_cases(classifier, images, targets, k: int, pass_size: int) -> dict:
    """Per-image certification of every row, as cases for ``interleaved``."""
    cases = {}
    wrapped = SmoothedClassifier(classifier, max_batch=pass_size)
    for m in PATCHES:
        masks = mask_set(tuple(images.shape[-2:]), m, k)
        cases[f"patchcleanser_m{m}"] = discarding(patchcleanser_outcomes, wrapped.ablated_logits, images, targets,
                                                  masks, 10)
    for name, spec in CITED.items():
        model = compose_experiment(spec["experiment"])
        deltas = torch.tensor([patch_delta(model.certification_masks((32, 32)), m) for m in PATCHES])
        cases[name] = discarding(lambda model=model, deltas=deltas:
                                 certify_votes(model.smoothed_counts(images), targets, deltas))
    return cases


def certify_votes(counts: torch.Tensor, targets: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Derandomized smoothing's certified-and-correct flags (N, P) from the votes (Eq. 1.2)."""
    return certified(counts, deltas) & (smoothed_prediction(counts) == targets)[:, None]


def throughput_cases(classifier, images, targets, masks, pass_size: int) -> dict:
    """The batched certifier against the same stacked forward passes without the bookkeeping, and one pair at a
    time."""
    wrapped = SmoothedClassifier(classifier, max_batch=pass_size)
    pairs = mask_pairs(len(masks))
    doubled = masks[pairs[:, 0]] * masks[pairs[:, 1]]
    per_call = max(1, 4096 // len(images))

    def bare():
        for part in doubled.split(per_call):
            for chunk in (images[:, None] * part[None, :, None]).flatten(0, 1).split(pass_size):
                classifier(chunk).argmax(-1)

    def naive():
        for mask in doubled:
            classifier(images * mask).argmax(-1)
    return {"bare loop (same stacked batches)": bare,
            "patchcleanser_outcomes": discarding(patchcleanser_outcomes, wrapped.ablated_logits, images, targets,
                                                 masks, 10),
            "naive loop (one mask pair per pass)": naive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="outputs/pc_digits", help="a finished patchcleanser_digits run")
    parser.add_argument("--out", default="docs/records", help="folder for the table records")
    parser.add_argument("--images", type=int, default=16, help="test images timed per case")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pass-size", type=int, default=1024, help="masked images per forward pass")
    args = parser.parse_args()
    run_dir, out = (ROOT / args.run).resolve(), (ROOT / args.out).resolve()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    missing = [f"cert/test/acc_m{m}" for m in PATCHES if f"cert/test/acc_m{m}" not in metrics]
    if missing:
        raise KeyError(f"{run_dir}/metrics.json lacks {missing}: the run has not finished its certification")
    config = read_hydra_config(run_dir)
    k = config.get("callbacks", {}).get("patchcleanser", {}).get("k", 6)
    classifier = trained_classifier(run_dir)
    images, targets = test_images(args.images)
    with torch.no_grad():
        cases = timing_cases(classifier, images, targets, k, args.pass_size)
        timings = interleaved(cases, repeats=args.repeats, warmup=0)
    per_image = {name: timing.best / len(images) for name, timing in timings.items()}
    rows = [{"name": "patchcleanser", "label": f"PatchCleanser (k = {k}), small CNN 8-16-32 (0.02 M), mask Cutout",
             **{f"clean_m{m}": 100 * metrics[f"cert/test/clean_m{m}"] for m in PATCHES},
             **{f"cert_m{m}": 100 * metrics[f"cert/test/acc_m{m}"] for m in PATCHES},
             **{f"seconds_m{m}": per_image[f"patchcleanser_m{m}"] for m in PATCHES}}]
    rows += [{"name": name, **{key: value for key, value in spec.items() if key != "experiment"},
              **{f"seconds_m{m}": per_image[name] for m in PATCHES}} for name, spec in CITED.items()]
    record = TableRecord("patchcleanser_digits", depends_on=DEPENDS_ON,
                         title="PatchCleanser vs derandomized smoothing, digits test split")
    record.add_config("patchcleanser", config)
    record.add_run("patchcleanser", run_dir=str(run_dir), timings={n: t.as_dict() for n, t in timings.items()})
    record.notes.append("derandomized-smoothing accuracies cited from docs/results.md (Smoothed ViT, digits table); "
                        "their s/image is both patch sizes at once (one vote set), measured here on untrained models")
    record.write(out, COLUMNS, rows)

    masks = mask_set(tuple(images.shape[-2:]), 4, k)
    with torch.no_grad():
        cases = throughput_cases(classifier, images, targets, masks, args.pass_size)
        speed = interleaved(cases, repeats=args.repeats + 1)
    summary = print_table(speed, reference="bare loop (same stacked batches)", work=len(images), unit="images")
    # one record per pass size: the table of 1,024 masked images per pass keeps its name, others name their size
    throughput_table = "patchcleanser_throughput" + ("" if args.pass_size == 1024 else f"_pass{args.pass_size}")
    throughput = TableRecord(throughput_table, depends_on=DEPENDS_ON,
                             title=f"PatchCleanser certification throughput, m = 4, "
                             f"k = {k}, {len(images)} images, {args.pass_size} masked images per pass")
    throughput.add_config("patchcleanser", config)  # the timed classifier's run, so the record's hash is not of {}
    throughput.write(out, THROUGHPUT_COLUMNS, [{"name": name, **row} for name, row in summary["cases"].items()])

    from render_results import render_table
    for name in ("patchcleanser_digits", throughput_table):
        print(render_table(json.loads((out / f"{name}.json").read_text())))


if __name__ == "__main__":
    main()
