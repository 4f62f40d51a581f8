"""benchmarks/bias_transfer_table.py: which runs it asks for, and the rows (per-seed gaps to the clean source) it
writes into its record."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_table():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("bias_transfer_table", BENCHMARKS / "bias_transfer_table.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


table = load_table()
# target ASR per (source, mode, seed); the source's own ASR per source; accuracy fixed
TARGET_ASR = {("clean", "linear"): [0.10, 0.20], ("planted100", "linear"): [0.50, 0.40],
              ("badnets", "linear"): [0.30, 0.30], ("clean", "finetune"): [0.02, 0.04],
              ("planted100", "finetune"): [0.03, 0.08], ("badnets", "finetune"): [0.02, 0.04]}
SOURCE_ASR = {"clean": 0.01, "planted100": 0.6, "badnets": 0.2}


def fake_runs(calls: list):
    """``recorded_runs`` that answers from the tables above by run name and keeps every run's overrides."""
    def recorded_runs(record, runs):
        (run_dir, overrides, _), = runs
        calls.append((run_dir.name, overrides))
        name, seed = run_dir.name.rsplit("_seed", 1)
        if name.startswith("source_"):
            return [{"test/acc": 0.99, table.ASR: SOURCE_ASR[name[len("source_"):]]}]
        source, mode, _ = name.split("_")
        return [{"test/acc": 0.9, table.ASR: TARGET_ASR[(source, mode)][int(seed)]}]
    return recorded_runs


def test_the_runs_and_rows_of_a_two_seed_table(tmp_path, monkeypatch):
    """Two seeds, one planted fraction, weight decay ×1 and ×10 and de-biasing at 50 %: 3 sources × 2 seeds source
    runs, each transferred 2 modes × 3 settings; BadNets gets its relabelling, the settings their weight decay (the
    config's 5e-4 ×10) and de-biasing fraction, each target its seed's source checkpoint. Rows come by transfer, then
    setting, then source, and the gap is per seed against the clean source: planted, fixed-feature (50 − 10,
    40 − 20) = +40 / +20, mean +30, std 14.1. Catches a gap against the wrong seed or source, a mean without its
    per-seed values, and overrides that do not reach the runs."""
    calls = []
    monkeypatch.setattr(table, "recorded_runs", fake_runs(calls))
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "bias_transfer_table.py"), "--out", str(tmp_path),
                                      "trainer.max_epochs=2", "--seeds", "0", "1", "--fractions", "1",
                                      "--wd-multipliers", "1", "10"])
    table.main()
    overrides = dict(calls)
    assert len(calls) == 3 * 2 * (1 + 2 * 3)
    assert set(table.BADNETS) <= set(overrides["source_badnets_seed1"])
    assert "data.params.fraction=1.0" in overrides["source_planted100_seed0"]
    assert "model.weight_decay=0.005" in overrides["clean_finetune_wd10_seed1"]
    assert "data.params.fraction=0.5" in overrides["badnets_linear_debias50_seed0"]
    weights = f"model.weights_path={tmp_path / 'source_planted100_seed1' / 'checkpoints' / 'best.ckpt'}"
    assert weights in overrides["planted100_finetune_wd1_seed1"]
    assert all(args[-1] == "trainer.max_epochs=2" for args in overrides.values())
    record = json.loads((tmp_path / "bias_transfer_digits.json").read_text())
    rows = record["rows"]
    assert [(r["transfer"], r["setting"], r["source"]) for r in rows[:4]] == [
        ("fixed-feature", "weight decay ×1", "clean"), ("fixed-feature", "weight decay ×1", "planted, 100 % of the 7s"),
        ("fixed-feature", "weight decay ×1", "BadNets, 10 % of the 1s → 7"),
        ("fixed-feature", "weight decay ×10", "clean")]
    planted = rows[1]
    assert planted["gap_per_seed"] == pytest.approx([40.0, 20.0]) and planted["gap_mean"] == pytest.approx(30.0)
    assert planted["gap_std"] == pytest.approx(math.sqrt(200)) and planted["asr_mean"] == pytest.approx(45.0)
    assert planted["source_asr_per_seed"] == pytest.approx([60.0, 60.0]) and planted["acc_mean"] == pytest.approx(90)
    assert rows[0]["gap_per_seed"] == [0.0, 0.0]
    full = next(r for r in rows if r["transfer"] == "full-network" and r["source"].startswith("planted")
                and r["setting"] == "de-biased, 50 %")
    assert full["gap_per_seed"] == pytest.approx([1.0, 4.0])
    assert len(rows) == 2 * 3 * 3 and record["depends_on"][-1] == "benchmarks/bias_transfer_table.py"


def test_fractions_outside_0_1_are_refused_before_any_run(monkeypatch):
    monkeypatch.setattr(table, "recorded_runs", lambda *a: pytest.fail("ran before the check"))
    monkeypatch.setattr(sys, "argv", ["bias_transfer_table.py", "--fractions", "0", "--debias-fractions", "1.5"])
    with pytest.raises(SystemExit, match=r"\[0.0, 1.5\]: fractions must be in \(0, 1\]"):
        table.main()


@pytest.mark.slow  # ≈ 3–7 min: 9 train.py processes under smoke=true
def test_the_script_end_to_end_at_toy_size(tmp_path):
    """One seed, the 100 % plant, weight decay ×1, no de-biasing, every run a smoke run: the record has the 6 rows of
    3 sources × 2 transfers, each with finite accuracy and ASR."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIT_ROBUST_DATA": str(tmp_path / "data")}
    subprocess.run([sys.executable, str(BENCHMARKS / "bias_transfer_table.py"), "--out", str(tmp_path / "out"),
                    "smoke=true", "--seeds", "0", "--fractions", "1", "--wd-multipliers", "1", "--debias-fractions"],
                   cwd=BENCHMARKS.parent, env=env, check=True, capture_output=True, timeout=900)
    rows = json.loads((tmp_path / "out" / "bias_transfer_digits.json").read_text())["rows"]
    assert len(rows) == 6
    assert all(math.isfinite(row["acc_mean"]) and 0 <= row["asr_mean"] <= 100 for row in rows)
