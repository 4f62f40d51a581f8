"""The Bayesian-VAE OOD tables of docs/results.md (thesis 004 ch. 3–5): each experiment once per weight posterior,
then two records per experiment from the merged ``metrics.json`` (``ood/<posterior>/<set>/<score>/<metric>``):

- ``bvae_<direction>_auroc``: AUROC (%) of every score against every outlier set, one row per posterior and set;
- ``bvae_<direction>_openood``: for the headline scores (``--scores``), the conventions users compare against —
  AUROC, FPR95 (FPR at 95 % TPR) and AUPR-Out, OpenOOD's set with AUPR-In, beside the thesis' FPR80 — all with the
  **outliers as the positive class** (AUPR-In takes the inliers as positive, the score negated);
- ``bvae_<direction>_posthoc`` (where the inliers have classes: digits): the same conventions for OpenOOD's post-hoc
  scores of a plain CNN classifier (``ImageClassifier``, ``small_cnn``, ``--classifier-epochs`` epochs) trained on the
  same inliers and scored by the same ``OODDetection`` config with ``scores=`` (MSP, max logit, energy, ODIN,
  Mahalanobis, KNN, ViM; fitted on the train split), so the likelihood scores sit beside the baselines users know.

Runs land in ``<out>/<experiment>/<posterior>/`` (one run dir each: a run's ``metrics.json`` holds that run only; the
classifier's in ``<out>/<experiment>/classifier/``); a run whose ``ood/<posterior>/...`` keys are already there is not
rerun, and the tables merge the posteriors' keys. Extra arguments are Hydra overrides for every run.

    python benchmarks/bvae_ood_tables.py --out outputs/bvae_tables
    python benchmarks/bvae_ood_tables.py --only digits_vs_natural --posteriors   # the classifier baselines alone
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from records import TableRecord, git_state, read_hydra_config, utc_now

from lit_robust.functional.ood_scores import CLASSIFIER_SCORES

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"natural_vs_digits": "bvae_natural_vs_digits", "digits_vs_natural": "bvae_digits_vs_natural"}
LABELLED_INLIERS = ("digits_vs_natural",)  # natural crops have no classes: no classifier to score
POSTERIORS = ("bbb", "sghmc", "none", "swag")
SCORES = ("expected_ll", "waic", "typicality", "disagreement", "entropy", "std_ll", "hole_indicator")
CLASSIFIER_TABLE = "scores"  # OODDetection's table name for a module without a ``posterior`` hyperparameter
CONVENTIONS = [("AUROC (%)", "auroc"), ("FPR95 (%)", "fpr95"), ("AUPR-In (%)", "aupr_in"),
               ("AUPR-Out (%)", "auprc"), ("FPR80 (%, thesis)", "fpr80")]

# what the numbers measure: a commit changing one of these makes the record stale (render_results.py --strict)
DEPENDS_ON = ["lit_robust/models/bayesian_vae.py",
              "lit_robust/models/weight_posteriors.py",
              "lit_robust/functional/ood_scores.py",
              "lit_robust/functional/ood_adversarial.py",
              "callbacks/ood_detection.py",
              "datamodules/ood.py",
              "conf/model/bayesian_vae.yaml",
              "conf/callbacks/ood.yaml",
              "conf/data/ood_pair.yaml"]


def outlier_sets(metrics: dict, posterior: str) -> list[str]:
    """The outlier sets a posterior was scored on, in the order they first appear."""
    sets = []
    for key in metrics:
        parts = key.split("/")
        if len(parts) == 5 and parts[0] == "ood" and parts[1] == posterior and parts[4] == "auroc" \
                and parts[2] not in sets:
            sets.append(parts[2])
    return sets


def auroc_table(metrics: dict, posteriors=POSTERIORS) -> tuple[list, list]:
    columns = [("posterior", "{posterior}"), ("outlier set", "{set}")] + [(s, f"{{{s}:.1f}}") for s in SCORES]
    rows = []
    for posterior in posteriors:
        for name in outlier_sets(metrics, posterior):
            row = {"posterior": posterior, "set": name}
            row.update({s: 100 * metrics[f"ood/{posterior}/{name}/{s}/auroc"] for s in SCORES
                        if f"ood/{posterior}/{name}/{s}/auroc" in metrics})
            rows.append(row)
    return columns, rows


def conventions_table(metrics: dict, scores: list[str], posteriors=POSTERIORS) -> tuple[list, list]:
    columns = [("posterior", "{posterior}"), ("outlier set", "{set}"), ("score", "{score}")] + [
        (header, f"{{{key}:.1f}}") for header, key in CONVENTIONS]
    rows = []
    for posterior in posteriors:
        for name in outlier_sets(metrics, posterior):
            for score in scores:
                prefix = f"ood/{posterior}/{name}/{score}"
                row = {"posterior": posterior, "set": name, "score": score}
                row.update({key: 100 * metrics[f"{prefix}/{key}"] for _, key in CONVENTIONS
                            if f"{prefix}/{key}" in metrics})
                rows.append(row)
    return columns, rows


def run(experiment: str, posterior: str, run_dir: Path, extra: list[str]) -> dict:
    """Train and score one posterior unless the run dir already has its keys; returns its provenance."""
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if outlier_sets(metrics, posterior):
        return {"reused": True}
    command = [sys.executable, "train.py", f"experiment={experiment}", f"model.posterior={posterior}",
               "+trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *extra]
    print("+", " ".join(command), flush=True)
    started, clock, git = utc_now(), time.monotonic(), git_state()
    subprocess.run(command, cwd=ROOT, check=True)
    return {"reused": False, "git": git, "started": started, "finished": utc_now(),
            "seconds": round(time.monotonic() - clock, 1)}


def classifier_run(experiment: str, run_dir: Path, extra: list[str], epochs: int) -> tuple[dict, dict]:
    """Train a small CNN on the experiment's inliers and score it with the experiment's ``OODDetection`` config plus
    ``scores=CLASSIFIER_SCORES``, unless the run dir already has its keys; returns its provenance and config."""
    import hydra
    import lightning as L
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from lit_robust import ImageClassifier
    from lit_robust.callbacks import MetricsFile
    from lit_robust.run.runner import CONFIG_MODULE

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"output_dir={run_dir}", *extra])
    classifier = {"backbone": "small_cnn", "num_classes": 10, "in_chans": 1, "max_epochs": epochs}
    config = {"data": OmegaConf.to_container(cfg.data, resolve=True), "classifier": classifier,
              "ood_detection": {**OmegaConf.to_container(cfg.callbacks.ood_detection, resolve=True),
                                "scores": list(CLASSIFIER_SCORES)}}
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists() and outlier_sets(json.loads(metrics_path.read_text()), CLASSIFIER_TABLE):
        return {"reused": True}, config
    print(f"+ classifier baselines of {experiment} into {run_dir}", flush=True)
    started, clock, git = utc_now(), time.monotonic(), git_state()
    L.seed_everything(cfg.seed)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = ImageClassifier(**{k: v for k, v in classifier.items() if k != "max_epochs"})
    callback = hydra.utils.instantiate(cfg.callbacks.ood_detection, scores=list(CLASSIFIER_SCORES), _convert_="all")
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir,
                        callbacks=[callback, MetricsFile(str(run_dir))])
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    return {"reused": False, "git": git, "started": started, "finished": utc_now(),
            "seconds": round(time.monotonic() - clock, 1)}, config


def posthoc_table(metrics: dict) -> tuple[list, list]:
    """The conventions table of the classifier's post-hoc scores (no posterior column)."""
    columns, rows = conventions_table(metrics, list(CLASSIFIER_SCORES), (CLASSIFIER_TABLE,))
    return columns[1:], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bvae_tables"))
    parser.add_argument("--only", nargs="*", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--posteriors", nargs="*", choices=POSTERIORS, default=list(POSTERIORS))
    parser.add_argument("--scores", nargs="*", choices=SCORES, default=["expected_ll", "std_ll", "hole_indicator"],
                        help="scores of the OpenOOD-conventions table")
    parser.add_argument("--classifier-epochs", type=int, default=20,
                        help="epochs of the CNN whose post-hoc scores are the baselines (0: no classifier table)")
    args, extra = parser.parse_known_args()
    out = (ROOT / args.out).resolve() if not args.out.is_absolute() else args.out
    for direction in args.only:
        experiment = EXPERIMENTS[direction]
        if args.posteriors:
            records = {kind: TableRecord(f"bvae_{direction}_{kind}", depends_on=[
                *DEPENDS_ON, f"conf/experiment/{experiment}.yaml"]) for kind in ("auroc", "openood")}
            metrics = {}
            for posterior in args.posteriors:
                run_dir = out / experiment / posterior
                provenance = run(experiment, posterior, run_dir, extra)
                for record in records.values():
                    record.add_run(posterior, run_dir=str(run_dir), **provenance)
                    record.add_config(posterior, read_hydra_config(run_dir))
                metrics.update(json.loads((run_dir / "metrics.json").read_text()))
            print(records["auroc"].write(out, *auroc_table(metrics, args.posteriors)))
            print(records["openood"].write(out, *conventions_table(metrics, args.scores, args.posteriors)))
        if args.classifier_epochs and direction in LABELLED_INLIERS:
            record = TableRecord(f"bvae_{direction}_posthoc", depends_on=[
                *DEPENDS_ON, "lit_robust/models/classifier.py", f"conf/experiment/{experiment}.yaml"])
            run_dir = out / experiment / "classifier"
            provenance, config = classifier_run(experiment, run_dir, extra, args.classifier_epochs)
            record.add_run("classifier", run_dir=str(run_dir), **provenance)
            record.add_config("classifier", config)
            print(record.write(out, *posthoc_table(json.loads((run_dir / "metrics.json").read_text()))))


if __name__ == "__main__":
    main()
