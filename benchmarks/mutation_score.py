"""Mutation score of the core math modules (issue 29): how many small code changes the fast unit tests catch.

    .venv/bin/python benchmarks/mutation_score.py                       # all six modules, ~10 min on 2 cores
    .venv/bin/python benchmarks/mutation_score.py --modules storage/cache functional/langevin --out /tmp/mutation

For each module, mutmut 3 (``pip install -e ".[dev]"``) runs in a fresh copy of the package and that module's fast
tests under a temporary folder, so the checkout is never written (the suite's ``conftest.py`` fails a run that writes
into it, and mutmut 3 writes a ``mutants/`` tree beside its config). Every mutant runs only the selected tests that
call the mutated function. Prints a per-module table and writes it, with the survivors' diffs, the git commit and the
machine, to ``<out>/mutation_score.json`` (``--out`` defaults to the ignored ``outputs/mutation``).

Score = (killed + timeout) / mutants, as Stryker counts it: a mutant that hangs the tests is detected. Mutants that no
selected test calls ("no tests") and suspicious ones count against the score. Not run in CI: it takes minutes.
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

ROOT = Path(__file__).resolve().parents[1]

# module → the fast tests that exercise it (pytest node ids or files); each selection runs in seconds.
MODULES = {
    "functional/derandomized_smoothing": ["tests/test_certification.py"],
    "functional/ablations": ["tests/test_ablations.py"],
    "functional/poison_success": ["tests/test_poison_metrics.py"],
    "functional/langevin": ["tests/test_langevin.py"],
    "functional/ood_scores": ["tests/test_ood_scores.py"],
    "functional/lime": ["tests/test_lime.py"],
    "functional/attacks": ["tests/test_attacks.py"],
    "functional/double_masking": ["tests/test_patchcleanser.py"],
    "storage/cache": ["tests/test_cache.py",
              "tests/test_bad_inputs.py::test_cache_entry_with_code_payload_and_matching_sha256"],
}
THREADS = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def mutmut_config(module: str, tests: list[str]) -> str:
    """The ``[tool.mutmut]`` section of the copy: mutate one module, select its tests."""
    return (f'\n[tool.mutmut]\nsource_paths = ["lit_robust"]\nonly_mutate = ["lit_robust/{module}.py"]\n'
            f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
            f'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n')


def prepare_copy(work: Path, module: str, tests: list[str]) -> None:
    """The package, the test files (selected tests import helpers from others) and ``pyproject.toml`` (plus the
    mutmut section, which selects ``tests``) under ``work``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "lit_robust", work / "lit_robust", ignore=ignore)
    (work / "tests").mkdir()
    for path in (ROOT / "tests").glob("*.py"):
        shutil.copy(path, work / "tests" / path.name)
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + mutmut_config(module, tests))


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
        diff = get_diff_for_mutant(mutant, path=f"lit_robust/{module}.py")
    finally:
        os.chdir(here)
    return [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def score_module(module: str, tests: list[str], scratch: Path, max_children: int) -> dict:
    """Run mutmut on one module in a fresh copy; count its mutants by status and keep the survivors' diffs."""
    from mutmut.stats import status_by_exit_code

    work = scratch / module
    prepare_copy(work, module, tests)
    start = time.perf_counter()
    with open(scratch / f"{module}.log", "w") as log:
        run = mutmut(work, "run", "--max-children", str(max_children), log=log)
    seconds = time.perf_counter() - start
    meta = work / "mutants" / "lit_robust" / f"{module}.py.meta"
    if run.returncode != 0 or not meta.exists():
        raise RuntimeError(f"mutmut failed on {module} (exit {run.returncode}); see {scratch / f'{module}.log'}")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    statuses = {name: status_by_exit_code[code] for name, code in codes.items()}
    counts = {status: sum(s == status for s in statuses.values())
              for status in ("killed", "timeout", "survived", "no tests", "suspicious")}
    counts["other"] = len(statuses) - sum(counts.values())
    not_killed = sorted(name for name, s in statuses.items() if s not in ("killed", "timeout"))
    survivors = [{"name": name, "status": statuses[name], "diff": changed_lines(work, module, name)}
                 for name in not_killed]
    return {"tests": tests, "mutants": len(statuses), **counts,
            "score": (counts["killed"] + counts["timeout"]) / max(len(statuses), 1),
            "seconds": round(seconds, 1), "survivors": survivors}


def machine() -> dict:
    """The record's commit and machine (``benchmarks/records.py``) and mutmut's version."""
    import mutmut
    from records import git_state
    from records import machine as recorded_machine

    return {**git_state(), **recorded_machine(), "mutmut": getattr(mutmut, "__version__", "?")}


def table(results: dict) -> str:
    lines = ["| module | mutants | killed | timeout | survived | no tests | suspicious | score | time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for module, r in results.items():
        lines.append(f"| `{module}.py` | {r['mutants']} | {r['killed']} | {r['timeout']} | {r['survived']} | "
                     f"{r['no tests']} | {r['suspicious'] + r['other']} | {100 * r['score']:.1f} % | "
                     f"{r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", choices=sorted(MODULES), default=list(MODULES))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "mutation",
                        help="folder for mutation_score.json (outside the repo or in the ignored outputs/)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="parallel mutant workers")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies and logs, and print where")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="lit-robust-mutation-"))
    try:
        results = {}
        for module in args.modules:
            results[module] = score_module(module, MODULES[module], scratch, args.max_children)
            r = results[module]
            print(f"{module}: {r['mutants']} mutants, score {100 * r['score']:.1f} % ({r['seconds']:.0f} s)",
                  flush=True)
    finally:
        if args.keep:
            print(f"copies and logs kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "modules": results, "table": table(results)}
    (args.out / "mutation_score.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out / 'mutation_score.json'}")


if __name__ == "__main__":
    main()
