"""benchmarks/gpu_check.py: without a GPU it says so and exits 0; ``--device cpu --tiny`` runs every part at toy
sizes and writes the report with every section (the GPU code exercised, nothing measured)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SECTIONS = {"machine", "tiny", "certification", "purification", "cifar_purification", "ddp", "adversarial_steps", "targets"}


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    result = gpu_check("--out", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "needs a CUDA GPU" in result.stdout and not (tmp_path / "report.json").exists()


@pytest.mark.slow  # ≈ 50 s (its DDP part starts 2 processes); the no-GPU path above is the CI check
def test_tiny_cpu_mode_runs_every_part_and_writes_every_section(tmp_path):
    result = gpu_check("--device", "cpu", "--tiny", "--out", str(tmp_path / "report.json"), "--record", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == SECTIONS and report["machine"]["device"] == "cpu"
    assert report["certification"]["ours_token_dropping_bf16_images_per_s"] > 0
    assert report["certification"]["ours_token_dropping_fp32_images_per_s"] > 0
    assert report["purification"]["callback_over_bare"] > 0 and report["cifar_purification"]["seconds"] > 0
    assert report["ddp"]["status"] == "ran" and report["ddp"]["identical"]  # 2 gloo processes = 1 process
    assert report["adversarial_steps"]["pgd_over_standard_fp32"] > 1 < report["adversarial_steps"]["trades_over_standard_fp32"]
    assert len(report["targets"]) == 6 and all(row["pass"] is None for row in report["targets"])  # toy sizes
    record = json.loads((tmp_path / "gpu_check.json").read_text())  # the table docs/results.md renders
    assert record["rows"] == report["targets"] and record["machine"]["cpu_model"]
