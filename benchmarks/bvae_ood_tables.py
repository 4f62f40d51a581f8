"""The Bayesian-VAE OOD tables of docs/results.md (thesis 004 ch. 3–5): each experiment once per weight posterior,
then two records per experiment from the merged ``metrics.json`` (``ood/<posterior>/<set>/<score>/<metric>``):

- ``bvae_<direction>_auroc``: AUROC (%) of every score against every outlier set, one row per posterior and set;
- ``bvae_<direction>_openood``: for the headline scores (``--scores``), the conventions users compare against —
  AUROC, FPR95 (FPR at 95 % TPR) and AUPR-Out, OpenOOD's set with AUPR-In, beside the thesis' FPR80 — all with the
  **outliers as the positive class** (AUPR-In takes the inliers as positive, the score negated).

Runs land in ``<out>/<experiment>/<posterior>/`` (one run dir each: a run's ``metrics.json`` holds that run only); a
posterior whose ``ood/<posterior>/...`` keys are already there is not rerun, and the tables merge the posteriors' keys.
Extra arguments are Hydra overrides for every run.

    python benchmarks/bvae_ood_tables.py --out outputs/bvae_tables
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import TableRecord, git_state, read_hydra_config, utc_now  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"natural_vs_digits": "bvae_natural_vs_digits", "digits_vs_natural": "bvae_digits_vs_natural"}
POSTERIORS = ("bbb", "sghmc", "none", "swag")
SCORES = ("expected_ll", "waic", "typicality", "disagreement", "entropy", "std_ll", "hole_indicator")
CONVENTIONS = [("AUROC (%)", "auroc"), ("FPR95 (%)", "fpr95"), ("AUPR-In (%)", "aupr_in"),
               ("AUPR-Out (%)", "auprc"), ("FPR80 (%, thesis)", "fpr80")]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bvae_tables"))
    parser.add_argument("--only", nargs="*", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--posteriors", nargs="*", choices=POSTERIORS, default=list(POSTERIORS))
    parser.add_argument("--scores", nargs="*", choices=SCORES, default=["expected_ll", "std_ll", "hole_indicator"],
                        help="scores of the OpenOOD-conventions table")
    args, extra = parser.parse_known_args()
    out = (ROOT / args.out).resolve() if not args.out.is_absolute() else args.out
    for direction in args.only:
        experiment = EXPERIMENTS[direction]
        records = {kind: TableRecord(f"bvae_{direction}_{kind}") for kind in ("auroc", "openood")}
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


if __name__ == "__main__":
    main()
