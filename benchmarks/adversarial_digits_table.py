"""Adversarial training on the embedded digits (thesis 001 ch. 2; issue #32): a standard, a PGD-AT (Madry et al.) and
a TRADES (Zhang et al.) small CNN of the same width, trained at ℓ∞ ε = 0.3, each evaluated by
``AdversarialEvaluation`` on test images at ε ∈ {0.1, 0.2, 0.3, 0.4, 0.6} under PGD-20, APGD-CE and APGD-T.

Rows: model × ε; columns: clean accuracy, robust accuracy under PGD-20, APGD-CE, APGD-CE + APGD-T (correct under
both; APGD-T attacks APGD-CE's survivors, AutoAttack's cascade) and all three, from the per-image records; at
ε = 0.3 the adversarially trained models also meet the black-box Square attack (300 queries), the gradient-masking
check: a model robust to the gradient attacks but not to Square would be masking its gradients. Then the cost of adversarial training: a PGD-AT step
over a standard step of the same model and batch, timed interleaved (``benchmarks/timing.py``) in this process.
Written to ``<out>/adversarial_digits.json`` (``benchmarks/records.py``) and ``<out>/metrics.json``;
``benchmarks/render_results.py`` puts the table into ``docs/results.md``. Extra arguments are Hydra overrides
applied to every run.

    OMP_NUM_THREADS=1 python benchmarks/adversarial_digits_table.py --out outputs/adversarial_digits_table
"""
from __future__ import annotations

import json
from pathlib import Path

from records import TableRecord, read_hydra_config, table_arguments, train_run

from lit_robust.storage.json_files import update_metrics_file

EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.6)
# the standard model: digits_classifier's recipe on the adversarially trained models' net, evaluated the same way
RUNS = {"standard": ["experiment=digits_classifier", "callbacks=adversarial",
                     "model.backbone_kwargs={widths:[16,32,64]}",
                     "callbacks.adversarial_evaluation.epsilons=[0.1,0.2,0.3,0.4,0.6]",
                     "callbacks.adversarial_evaluation.masking_eps=0.6",
                     "callbacks.adversarial_evaluation.num_images=null",
                     "callbacks.adversarial_evaluation.apgd_steps=25",
                     "callbacks.adversarial_evaluation.num_targets=3"],
        "pgd_at": ["experiment=adv_train_digits"], "trades": ["experiment=trades_digits"]}
LABELS = {"standard": "standard", "pgd_at": "PGD-AT (Madry)", "trades": "TRADES (β = 6)"}
COLUMNS = [("model", "{label}"), ("ε", "{eps:g}"), ("clean (%)", "{clean:.1f}"), ("PGD-20 (%)", "{pgd:.1f}"),
           ("APGD-CE (%)", "{apgd_ce:.1f}"), ("APGD-CE+T (%)", "{apgd_both:.1f}"), ("all three (%)", "{robust:.1f}"),
           ("Square-300 (%)", "{square:.1f}"), ("all + Square (%)", "{with_square:.1f}")]

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/models/adversarial.py",
              "lit_robust/models/classifier.py",
              "lit_robust/functional/attacks.py",
              "callbacks/adversarial_evaluation.py",
              "conf/experiment/digits_classifier.yaml",
              "conf/experiment/adv_train_digits.yaml",
              "conf/experiment/trades_digits.yaml",
              "conf/model/adversarial.yaml",
              "conf/callbacks/adversarial.yaml"]


def table_rows(name: str, run_dir: Path) -> list[dict]:
    """One row per ε from the run's per-image records (``adversarial/test_records.json``)."""
    images = json.loads((run_dir / "adversarial" / "test_records.json").read_text())["images"]
    share = lambda test: 100.0 * sum(map(test, images)) / len(images)  # noqa: E731
    rows = []
    for eps in EPSILONS:
        tag = f"eps{eps:g}"
        rows.append({"name": name, "label": LABELS[name], "eps": eps, "images": len(images),
                     "clean": share(lambda r: r["clean"]), "pgd": share(lambda r: r[f"{tag}/pgd"]),
                     "apgd_ce": share(lambda r: r[f"{tag}/apgd-ce"]),
                     "apgd_both": share(lambda r: r[f"{tag}/apgd-ce"] and r[f"{tag}/apgd-t"]),
                     "robust": share(lambda r: r[f"{tag}/robust"])})
    return rows


def square_correct(config: dict, run_dir: Path, indices: list[int], eps: float = 0.3, steps: int = 300) -> list[bool]:
    """Per evaluated test image (``indices`` of the split), whether the run's best checkpoint still classifies it
    correctly under the black-box Square attack (p_init = 0.3, the paper's MNIST setting): the gradient-masking check
    beside the white-box attacks."""
    import hydra
    import torch

    from lit_robust.functional.attacks import square_linf
    from lit_robust.models.nets import load_weights

    model = load_weights(hydra.utils.instantiate(config["model"], _convert_="all"),
                         str(run_dir / "checkpoints" / "best.ckpt")).eval()
    datamodule = hydra.utils.instantiate(config["data"], _convert_="all")
    datamodule.setup("test")
    x, y = datamodule.test_dataset.images[indices], datamodule.test_dataset.targets[indices]
    adv = square_linf(model, x, y, eps, steps, p_init=0.3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(adv).argmax(1) == y).tolist()


def step_cost(config: dict, batch_size: int = 128, repeats: int = 5) -> dict:
    """Seconds of one optimiser step with the PGD-AT loss over one with the standard loss, same model and batch."""
    import hydra
    import torch
    from adversarial_cost import step_timings

    model = hydra.utils.instantiate(config["model"], _convert_="all").train()
    return step_timings(model, torch.rand(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,)), repeats)


def main() -> None:
    args, extra, out = table_arguments(__doc__, "outputs/adversarial_digits_table", RUNS)
    record = TableRecord("adversarial_digits", depends_on=DEPENDS_ON,
                         title="Adversarial training on digits, ℓ∞ ε = 0.3 (test images)")
    rows = []
    for name in args.only:
        metrics, provenance = train_run(out / name, [*RUNS[name], *extra])
        if not metrics:
            print(f"{name} is not finished: no table written")
            return
        record.add_run(name, run_dir=str(out / name), **provenance)
        record.add_config(name, read_hydra_config(out / name))
        rows += table_rows(name, out / name)
        if name != "standard":  # the standard model is already at 0 under the gradient attacks
            images = json.loads((out / name / "adversarial" / "test_records.json").read_text())["images"]
            square = square_correct(read_hydra_config(out / name), out / name, [r["index"] for r in images])
            row = next(r for r in rows if r["name"] == name and r["eps"] == 0.3)
            row["square"] = 100.0 * sum(square) / len(square)
            row["with_square"] = 100.0 * sum(s and r["eps0.3/robust"] for s, r in zip(square, images)) / len(square)
    cost = step_cost(read_hydra_config(out / "pgd_at")) if "pgd_at" in args.only else None
    if cost:
        record.notes.append(f"PGD-AT step / standard step = {cost['ratio']:.2f} with {cost['attack_steps']} attack "
                            f"steps (bound: steps + 1.3 = {cost['attack_steps'] + 1.3:.1f})")
        record.runs["step_cost"] = cost
    update_metrics_file(out / "metrics.json", {f"table/{r['name']}/eps{r['eps']:g}/{k}": float(v) for r in rows
                                               for k, v in r.items() if k not in ("name", "label", "eps")})
    path = record.write(out, COLUMNS, rows)
    from render_results import render_table
    print(render_table(json.loads(path.read_text())))
    print("\n".join(record.notes))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
