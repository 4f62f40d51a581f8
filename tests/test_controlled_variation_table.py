"""``benchmarks/controlled_variation_table.py`` end to end at toy size (``smoke=true``, one seed): both trainings run
through ``train.py`` into the output folder and the record holds one row per measure with each training's per-seed
value read from its run's ``metrics.json``, the cue planted only in the cue run's config. Two ``train.py`` processes
(about 15 s of CPU each, most of it imports): marked slow."""
from __future__ import annotations

import json
import math
import sys

import controlled_variation_table as table
import pytest
from conftest import REPO


@pytest.mark.slow
def test_the_table_runs_both_trainings_and_records_every_measure(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO / "benchmarks" / "controlled_variation_table.py"), "smoke=true",
                                      "--out", str(tmp_path), "--seeds", "0"])
    table.main()
    record = json.loads((tmp_path / "controlled_variation_digits.json").read_text())
    assert "benchmarks/controlled_variation_table.py" in record["depends_on"]
    assert {name: config["data"]["cue_strength"] for name, config in record["configs"].items()} == {
        "no_cue_seed0": 0.0, "cue_seed0": 0.9}
    assert [row["measure"] for row in record["rows"]] == list(table.MEASURES)
    for training in ("no_cue", "cue"):
        metrics = json.loads((tmp_path / f"{training}_seed0" / "metrics.json").read_text())
        for row in record["rows"]:
            key, scale = table.MEASURES[row["measure"]]
            assert row[f"{training}_per_seed"] == [scale * metrics[key]] and (
                row[f"{training}_mean"] == scale * metrics[key] or math.isnan(metrics[key]))
