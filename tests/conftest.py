"""Shared test helpers: run the entry points as a user would, in a subprocess from the repository root."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *overrides: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``python <script> overrides...`` from the repo root, with 1 thread per process (CI has 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, script, *overrides], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def _repo_status() -> set[str] | None:
    """``git status`` of the checkout (ignored paths included, caches excluded); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    skip = ("__pycache__", ".pytest_cache", ".egg-info", ".venv")
    return {line for line in out.stdout.splitlines() if not any(part in line for part in skip)}


@pytest.fixture(scope="session", autouse=True)
def tests_write_only_to_temporary_folders():
    """A test run must leave the checkout as it found it (old runs committed a metrics.json and plots/ to the root):
    anything a test writes belongs under tmp_path."""
    before = _repo_status()
    yield
    after = _repo_status()
    if before is not None and after is not None and after - before:
        pytest.fail(f"tests wrote into the repository {REPO}: {sorted(after - before)}; write under tmp_path instead")
