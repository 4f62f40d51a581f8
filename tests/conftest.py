"""Shared test helpers: run the entry points as a user would, in a subprocess from the repository root."""
from __future__ import annotations

import json
import os
import shutil
import site
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


# The sources a wheel of this checkout is built from (``installed``).
SOURCES = ("pyproject.toml", "README.md", "lit_robust", "datamodules", "callbacks", "conf")


def run_checked(command: list, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} failed in {cwd}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> dict:
    """A fresh venv with the wheel of this checkout installed; returns its bin dir and the env to run it with."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"  # a copy, so that the in-tree build (build/, *.egg-info) never touches the checkout
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    run_checked([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                 root / "wheel", source], cwd=root)
    wheel = next((root / "wheel").glob("lit_robust-*.whl"))
    venv = root / "venv"
    run_checked([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    # before the .pth below: pip must not see (and replace) this environment's own lit_robust
    run_checked([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
                 wheel], cwd=root)
    purelib = subprocess.check_output([venv / "bin" / "python", "-c", "import sysconfig; "
                                       "print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    (Path(purelib) / "_lit_robust_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1", PYTHONNOUSERSITE="1")
    return {"bin": venv / "bin", "venv": venv, "env": env, "wheel": wheel}


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
