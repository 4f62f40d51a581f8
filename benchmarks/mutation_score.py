"""Mutation score per module (issues 29 and 48): how many small code changes the fast unit tests catch.

    .venv/bin/python benchmarks/mutation_score.py --modules callbacks/certification lit_robust/models/ebm --out /tmp/m
    .venv/bin/python benchmarks/mutation_score.py --modules callbacks/shift_sweep --merge docs/records/mutation_score.json \
        --out docs/records --max-children 1

Modules are paths relative to the repository root without ``.py`` (``MODULES`` lists them with their fast tests). For
each module, mutmut 3 (``pip install -e ".[dev]"``) runs in a fresh copy of the package and that module's fast tests
under a temporary folder, so the checkout is never written (the suite's ``conftest.py`` fails a run that writes into
it, and mutmut 3 writes a ``mutants/`` tree beside its config). The copy nests ``callbacks/``, ``datamodules/`` and
``conf/`` inside ``lit_robust/`` as the wheel installs them, so ``lit_robust.callbacks.<module>`` imports the mutated
copy; its ``@override`` markers are dropped there (``MARKERS``), since mutmut 3 does not mutate decorated functions
(those it still leaves, e.g. under ``@torch.no_grad()``, are listed in the row as ``not_mutated``). Every mutant runs
only the selected tests that call the mutated function.

Score = (killed + timeout) / (mutants − equivalent), as Stryker counts it: a mutant that hangs the tests is detected,
and a survivor leaves the denominator only when ``EQUIVALENT`` lists it with the reason no test can tell it apart.
Mutants that no selected test calls ("no tests") and suspicious ones count as survivors. The table is written through
``benchmarks/records.py`` to ``<out>/mutation_score.json`` with each module's commit, time and survivors' diffs;
``--merge`` starts from an earlier record, so a long pass can be split into runs (one module at a time on a shared
machine) whose rows are merged, a module run again replacing its old row. Not run in CI: it takes minutes a module.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from records import ROOT, TableRecord, git_state, machine, utc_now

# module (repository path without .py) → the fast tests that exercise it (pytest files or node ids, seconds each).
MODULES = {
    "lit_robust/functional/derandomized_smoothing": ["tests/test_certification.py"],
    "lit_robust/functional/ablations": ["tests/test_ablations.py"],
    "lit_robust/functional/poison_success": ["tests/test_poison_metrics.py"],
    "lit_robust/functional/langevin": ["tests/test_langevin.py"],
    "lit_robust/functional/ood_scores": ["tests/test_ood_scores.py"],
    "lit_robust/functional/lime": ["tests/test_lime.py"],
    "lit_robust/functional/attacks": ["tests/test_attacks.py"],
    "lit_robust/functional/double_masking": ["tests/test_patchcleanser.py"],
    "lit_robust/storage/cache": ["tests/test_cache.py",
                                 "tests/test_bad_inputs.py::test_cache_entry_with_code_payload_and_matching_sha256"],
    "lit_robust/functional/ispl": ["tests/test_ispl.py"],
    "lit_robust/functional/weak_learners": ["tests/test_weak_learners.py", "tests/test_ispl.py"],
    "lit_robust/functional/backdoor_filters": ["tests/test_backdoor_filters.py"],
    "lit_robust/functional/missingness_bias": ["tests/test_missingness.py"],
    "callbacks/adversarial_evaluation": ["tests/test_adversarial.py"],
    "callbacks/augmentation": ["tests/test_augmentation.py"],
    "callbacks/baseline_filters": ["tests/test_weak_learner_filter.py"],
    "callbacks/certification": ["tests/test_smoothed_vit.py"],
    "callbacks/contract": ["tests/test_shard_map.py", "tests/test_contract_plain_project.py",
                           "tests/test_purification.py"],
    "callbacks/counterfactual_report": ["tests/test_causal_vae.py", "tests/test_counterfactual_report.py"],
    "callbacks/latent_grid": ["tests/test_latent_grid.py"],
    "callbacks/metrics_file": ["tests/test_metrics_file.py", "tests/test_contract_plain_project.py"],
    "callbacks/missingness": ["tests/test_missingness.py"],
    "callbacks/ood_detection": ["tests/test_ood_detection.py", "tests/test_ood_plain_project.py"],
    "callbacks/patchcleanser": ["tests/test_patchcleanser.py"],
    "callbacks/poison_metrics": ["tests/test_poison_metrics_callback.py", "tests/test_contract_plain_project.py"],
    "callbacks/purification": ["tests/test_purification.py"],
    "callbacks/robustness_report": ["tests/test_deep_cama.py"],
    "callbacks/shift_sweep": ["tests/test_shift_sweep.py"],
    "callbacks/weak_learner_filter": ["tests/test_weak_learner_filter.py"],
    "lit_robust/models/adversarial": ["tests/test_adversarial.py"],
    "lit_robust/models/bayesian_vae": ["tests/test_bayesian_vae.py"],
    "lit_robust/models/causal_vae": ["tests/test_causal_vae.py"],
    "lit_robust/models/ddpm": ["tests/test_ddpm.py"],
    "lit_robust/models/deep_cama": ["tests/test_deep_cama.py"],
    "lit_robust/models/ebm": ["tests/test_ebm.py"],
    "lit_robust/models/smoothed_vit": ["tests/test_smoothed_vit.py"],
    "lit_robust/poisons/badnets": ["tests/test_poisons.py", "tests/test_poisoned_datamodule.py"],
    "lit_robust/poisons/bullseye": ["tests/test_targeted_poisons.py"],
    "lit_robust/poisons/crafted": ["tests/test_poisons.py", "tests/test_targeted_poisons.py"],
    "lit_robust/poisons/gradient_matching": ["tests/test_targeted_poisons.py"],
    "lit_robust/poisons/narcissus": ["tests/test_poisons.py"],
    "lit_robust/poisons/surrogate": ["tests/test_targeted_poisons.py", "tests/test_poison_metrics_callback.py"],
    "lit_robust/poisons/victims": ["tests/test_transfer_classifier.py"],
}
# exact_resume.py and last_checkpoint.py are left out: their tests (tests/test_resume.py) run train.py in a
# subprocess, which mutmut's per-test function map cannot see; so is metric_eval.py, whose one function is decorated.
# module → {mutant name: why no test can tell it from the original}; only these leave the score's denominator.
EQUIVALENT: dict[str, dict[str, str]] = {
    "callbacks/shift_sweep": {
        "lit_robust.callbacks.shift_sweep.xǁShiftSweepǁ__init____mutmut_3":
            "default batch_size 257 for 256: images per forward pass, the accuracy is the same",
        "lit_robust.callbacks.shift_sweep.xǁShiftSweepǁevaluate__mutmut_21":
            "batch_size not passed to run_metric, whose default is the same 256",
        "lit_robust.callbacks.shift_sweep.xǁShiftSweepǁevaluate__mutmut_3":
            "MulticlassAccuracy(None, average='micro'): micro accuracy needs no class count",
        "lit_robust.callbacks.shift_sweep.xǁShiftSweepǁevaluate__mutmut_5":
            "MulticlassAccuracy without the class count: micro accuracy needs none",
        "lit_robust.callbacks.shift_sweep.xǁShiftSweepǁevaluate__mutmut_7":
            "sync_on_compute dropped: syncing the gathered whole again doubles correct and total alike",
        **{f"lit_robust.callbacks.shift_sweep.xǁShiftSweepǁon_test_epoch_end__mutmut_{n}":
           "log_dict's sync_dist None, dropped or True: the gathered numbers are equal on every rank, so a mean over"
           " ranks is the same number" for n in (2, 4, 9)},
    },
    "callbacks/poison_metrics": {
        "lit_robust.callbacks.poison_metrics.xǁPoisonMetricsǁ__init____mutmut_3":
            "default batch_size 257 for 256: images per forward pass, the numbers are the same",
        "lit_robust.callbacks.poison_metrics.xǁPoisonMetricsǁevaluate__mutmut_22":
            "batch_size not passed to run_metric, whose default is the same 256",
        **{f"lit_robust.callbacks.poison_metrics.xǁPoisonMetricsǁevaluate__mutmut_{n}":
           "MulticlassAccuracy without the class count (micro accuracy needs none) or without sync_on_compute=False"
           " (syncing the gathered whole again doubles correct and total alike)" for n in (4, 6, 8)},
        "lit_robust.callbacks.poison_metrics.xǁPoisonMetricsǁevaluate__mutmut_58":
            "AttackSuccessRate without sync_on_compute=False: a second sync doubles hits and total alike",
        "lit_robust.callbacks.poison_metrics.xǁPoisonMetricsǁevaluate__mutmut_77":
            "batch_size not passed to the Eq. 7.1 run_metric, whose default is the same 256",
        "lit_robust.callbacks.poison_metrics.xǁPoisonMetricsǁevaluate__mutmut_46":
            "the poisons moved .to(None) instead of the module's device: the same device on a CPU-only machine",
        **{f"lit_robust.callbacks.poison_metrics.xǁPoisonMetricsǁon_test_epoch_end__mutmut_{n}":
           "log_dict's sync_dist None, dropped or True: the gathered numbers are equal on every rank, so a mean over"
           " ranks is the same number" for n in (2, 4, 9)},
    },
    "callbacks/latent_grid": {
        **{f"lit_robust.callbacks.latent_grid.xǁLatentAugmentationGridǁon_test_end__mutmut_{n}":
           "the tiles' clamp to [0, 1] loosened: they are in [0, 1] already (the contract refuses other inputs, flips"
           " and rotations keep the range, the decoder ends in a sigmoid)" for n in (95, 96, 98, 112)},
        **{f"lit_robust.callbacks.latent_grid.xǁLatentAugmentationGridǁon_test_end__mutmut_{n}":
           "squeeze(+1) / squeeze(-2) on an (H, W, 1) tile: imshow draws it as the (H, W) one" for n in (109, 110)},
        **{f"lit_robust.callbacks.latent_grid.xǁLatentAugmentationGridǁon_test_end__mutmut_{n}":
           "matplotlib backend 'agg' / 'AGG' for 'Agg': backend names are case-insensitive" for n in (73, 74)},
        "lit_robust.callbacks.latent_grid.xǁLatentAugmentationGridǁon_test_end__mutmut_146":
            "plt.close(None) closes the current figure, which is fig",
        "lit_robust.callbacks.latent_grid.xǁLatentAugmentationGridǁon_test_end__mutmut_30":
            "x0.to(None) for the module's device: on a CPU-only machine both are the CPU",
    },
    "callbacks/patchcleanser": {
        "lit_robust.callbacks.patchcleanser.xǁPatchCleanserCertificationǁevaluate__mutmut_11":
            "the image size read off item 1 instead of item 0: a split batched into one tensor has one size",
        "lit_robust.callbacks.patchcleanser.xǁPatchCleanserCertificationǁevaluate__mutmut_63":
            "CertifiedAccuracy.to(None) for the targets' device: on a CPU-only machine both are the CPU",
        **{f"lit_robust.callbacks.patchcleanser.xǁPatchCleanserCertificationǁevaluate__mutmut_{n}":
           "CertifiedAccuracy syncing the gathered whole again, or log_dict averaging equal numbers over ranks:"
           " counts double alike and equal values average to themselves" for n in (67, 68, 92, 94, 95)},
    },
    "callbacks/metrics_file": {
        "lit_robust.callbacks.metrics_file.xǁMetricsFileǁ__init____mutmut_6": "started None for False: both falsy",
    },
    "callbacks/counterfactual_report": {
        "lit_robust.callbacks.counterfactual_report.x_fit_factor_regressor__mutmut_32":
            "AdamW without lr=: OneCycleLR(max_lr=lr) sets every group's learning rate when it is built, so AdamW's"
            " own is never used",
        **{f"lit_robust.callbacks.counterfactual_report.xǁCounterfactualReportǁ_plot__mutmut_{n}":
           "matplotlib backend 'agg' / 'AGG' for 'Agg': backend names are case-insensitive" for n in (3, 4)},
        "lit_robust.callbacks.counterfactual_report.xǁCounterfactualReportǁ_plot__mutmut_11":
            "subplots(squeeze=None) for False: None is false too, the axes stay a 2-D array",
        "lit_robust.callbacks.counterfactual_report.xǁCounterfactualReportǁ_plot__mutmut_70":
            "plt.close(None) closes the current figure, which is fig",
        "lit_robust.callbacks.counterfactual_report.xǁCounterfactualReportǁ_regressor__mutmut_1":
            "path '' for None without a cache_dir: both falsy, and the path is only read through `if path`",
        "lit_robust.callbacks.counterfactual_report.xǁCounterfactualReportǁmeasure__mutmut_18":
            "to_unit(check=None) for False on the model's images: None is false too, no range check either way",
        **{f"lit_robust.callbacks.counterfactual_report.xǁCounterfactualReportǁmeasure__mutmut_{n}":
           "regressor, images, factors or span .to(None) for the model's device: on a CPU-only machine both are the"
           " CPU" for n in (12, 27, 28, 89)},
    },
}
# the top-level folders the wheel installs inside the package (pyproject's package-dir), nested so in the copy
NESTED = ("callbacks", "datamodules", "conf")
# typing_extensions' @override only marks a hook as overriding; mutmut 3 leaves every decorated function but static
# and class methods unmutated, so the copy of the mutated module drops this marker and its hooks are mutated too.
MARKERS = ("@override",)
THREADS = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
COLUMNS = [("module", "`{name}.py`"), ("mutants", "{mutants}"), ("killed", "{killed}"), ("timeout", "{timeout}"),
           ("survived", "{survived}"), ("no tests", "{no_tests}"), ("equivalent", "{equivalent}"),
           ("score", "{score:.1f} %")]


def copy_path(module: str) -> str:
    """The module's file in the copy: ``callbacks/x`` is ``lit_robust/callbacks/x.py`` there, as in the wheel."""
    top = module.split("/", 1)[0]
    return f"lit_robust/{module}.py" if top in NESTED else f"{module}.py"


def mutmut_config(module: str, tests: list[str]) -> str:
    """The ``[tool.mutmut]`` section of the copy: mutate one module, select its tests."""
    return (f'\n[tool.mutmut]\nsource_paths = ["lit_robust"]\nonly_mutate = ["{copy_path(module)}"]\n'
            f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
            f'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\nalso_copy = ["examples"]\n')


def prepare_copy(work: Path, module: str, tests: list[str]) -> None:
    """The package with ``callbacks/``, ``datamodules/`` and ``conf/`` inside it, the test files (selected tests import
    helpers from others) and ``pyproject.toml`` (plus the mutmut section, which selects ``tests``) under ``work``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "lit_robust", work / "lit_robust", ignore=ignore)
    for folder in NESTED:
        shutil.copytree(ROOT / folder, work / "lit_robust" / folder, ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    shutil.copytree(ROOT / "examples", work / "examples", ignore=ignore)  # the plain-Lightning project tests import
    mutated = work / copy_path(module)
    mutated.write_text("".join(line for line in mutated.read_text().splitlines(keepends=True)
                               if line.strip() not in MARKERS))
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + mutmut_config(module, tests))


def decorated_functions(path: Path) -> list[str]:
    """Functions mutmut 3 leaves unmutated: those with a decorator other than ``staticmethod``/``classmethod``."""
    import ast

    kept = {"staticmethod", "classmethod"}
    return sorted(node.name for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  and {ast.unparse(d) for d in node.decorator_list} - kept)


def mutmut(work: Path, *args: str, log=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mutmut", *args]
    env = {**os.environ, **THREADS, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, cwd=work, env=env, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def changed_lines(work: Path, module: str, mutant: str) -> list[str]:
    """The removed and added lines of one mutant (``mutmut show`` without its start-up per mutant)."""
    from mutmut.configuration import reset_config
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    here = Path.cwd()
    os.chdir(work)
    try:
        reset_config()
        diff = get_diff_for_mutant(mutant, path=copy_path(module))
    finally:
        os.chdir(here)
    return [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def score_module(module: str, tests: list[str], scratch: Path, max_children: int) -> dict:
    """Run mutmut on one module in a fresh copy; count its mutants by status, keep the survivors' diffs and the
    reasons of those listed as equivalent."""
    from mutmut.stats import status_by_exit_code

    work = scratch / module
    prepare_copy(work, module, tests)
    log_path = scratch / f"{module.replace('/', '.')}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        run = mutmut(work, "run", "--max-children", str(max_children), log=log)
    seconds = time.perf_counter() - start
    meta = work / "mutants" / f"{copy_path(module)}.meta"
    if run.returncode != 0 or not meta.exists():
        raise RuntimeError(f"mutmut failed on {module} (exit {run.returncode}); see {log_path}")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    statuses = {name: status_by_exit_code[code] for name, code in codes.items()}
    detected = sum(s in ("killed", "timeout") for s in statuses.values())
    reasons = EQUIVALENT.get(module, {})
    survivors = [{"name": name, "status": status, "diff": changed_lines(work, module, name),
                  **({"equivalent": reasons[name]} if name in reasons else {})}
                 for name, status in sorted(statuses.items()) if status not in ("killed", "timeout")]
    equivalent = sum("equivalent" in s for s in survivors)
    stale = sorted(set(reasons) - {s["name"] for s in survivors})
    if stale:
        print(f"{module}: listed as equivalent but detected or gone (update EQUIVALENT): {stale}", flush=True)
    count = {status: sum(s == status for s in statuses.values()) for status in ("killed", "timeout", "no tests")}
    return {"name": module, "mutants": len(statuses), "killed": count["killed"], "timeout": count["timeout"],
            "no_tests": count["no tests"], "survived": len(statuses) - detected - count["no tests"],
            "equivalent": equivalent, "score": 100 * detected / max(len(statuses) - equivalent, 1),
            "seconds": round(seconds, 1), "not_mutated": decorated_functions(work / copy_path(module)),
            "survivors": survivors}


def merged_rows(previous: list[Path], rows: list[dict]) -> tuple[list[dict], dict, dict]:
    """The earlier records' rows, configs and runs (a later record's module replacing an earlier one's), with the
    modules run now replacing theirs, in ``MODULES`` order."""
    by_name, configs, runs = {}, {}, {}
    for path in previous:
        old = json.loads(path.read_text())
        by_name |= {row["name"]: row for row in old["rows"]}
        configs |= old["configs"]
        runs |= old["runs"]
    by_name |= {row["name"]: row for row in rows}
    order = [name for name in MODULES if name in by_name] + sorted(set(by_name) - set(MODULES))
    return [by_name[name] for name in order], configs, runs


def measured_paths(modules) -> list[str]:
    """What the scores depend on: each measured module's file and the test files that score it."""
    paths = []
    for module in modules:
        paths += [f"{module}.py", *(test.split("::")[0] for test in MODULES.get(module, []))]
    return sorted(set(paths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="*", choices=list(MODULES), default=list(MODULES), metavar="MODULE",
                        help="repository paths without .py (default: all of MODULES; none: only merge --merge)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "mutation",
                        help="folder for mutation_score.json (outside the repo or in the ignored outputs/)")
    parser.add_argument("--merge", type=Path, nargs="+", default=[],
                        help="earlier mutation_score.json files whose other modules are kept (later files win)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="parallel mutant workers")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies and logs, and print where")
    args = parser.parse_args()
    for path in args.merge:
        if not path.is_file():
            parser.error(f"--merge {path} is not a file; pass earlier <out>/mutation_score.json files or leave it out")

    scratch = Path(tempfile.mkdtemp(prefix="lit-robust-mutation-"))
    rows, runs = [], {}
    try:
        for module in args.modules:
            started, git = utc_now(), git_state()
            row = score_module(module, MODULES[module], scratch, args.max_children)
            rows.append(row)
            runs[module] = {"git": git, "started": started, "finished": utc_now(), "seconds": row["seconds"],
                            "max_children": args.max_children, "machine": machine()}
            print(f"{module}: {row['mutants']} mutants, score {row['score']:.1f} % ({row['seconds']:.0f} s)",
                  flush=True)
    finally:
        if args.keep:
            print(f"copies and logs kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    rows, configs, old_runs = merged_rows(args.merge, rows)
    record = TableRecord("mutation_score", depends_on=measured_paths(row["name"] for row in rows),
                         title="Mutation score per module (mutmut 3)")
    record.configs = {**configs, **{m: {"tests": MODULES[m], "max_children": args.max_children} for m in runs}}
    record.runs = {**old_runs, **runs}
    import mutmut
    record.notes.append(f"mutmut {getattr(mutmut, '__version__', '?')}; score = (killed + timeout) / "
                        "(mutants - equivalent); survived counts suspicious mutants too")
    path = record.write(args.out, COLUMNS, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
