"""``benchmarks/logo_purification_table.py``: Table E.6's layout (one row per defence, the logo's success and natural
accuracy at every α) with the per-seed values of each mean, and a toy run of the whole script into tmp_path."""
import json

import logo_purification_table as table
import pytest


def metrics(asr, acc):
    return {"poison/asr_x1": asr, "poison/natural_acc": acc}


def test_rows_are_defences_with_each_alphas_success_and_accuracy_and_their_seeds():
    per_alpha = {0.1: {"undefended": {0: metrics(0.9, 0.98), 1: metrics(0.7, 0.96)},
                       "PureEBM": {0: metrics(0.02, 0.95), 1: metrics(0.04, 0.93)}},
                 0.4: {"undefended": {1: metrics(1.0, 0.97), 0: metrics(0.8, 0.95)},
                       "PureEBM": {0: metrics(0.5, 0.90)}}}
    rows, summary = table.table_rows(per_alpha)
    undefended, ebm = rows
    assert undefended["name"] == "undefended" and undefended["seeds"] == "0, 1"
    assert undefended["asr_a10_mean"] == pytest.approx(80.0)
    assert undefended["asr_a10_per_seed"] == pytest.approx([90.0, 70.0])
    assert undefended["asr_a40_per_seed"] == pytest.approx([80.0, 100.0])        # seed order, not insertion order
    assert undefended["natural_acc_a40_std"] == pytest.approx(1.4142135624)
    assert ebm["asr_a40_per_seed"] == [50.0] and ebm["natural_acc_a10_mean"] == pytest.approx(94.0)
    assert summary["alpha0.1/bounds/PureEBM/asr_x1_fraction_of_undefended"] == pytest.approx(0.03 / 0.8)
    assert summary["alpha0.4/table/PureEBM/natural_acc/seed0"] == 0.90
    headers = [header for header, _ in table.columns([0.1, 0.4])]
    assert headers == ["defence", "logo success α=0.1 (%)", "logo success α=0.4 (%)", "natural accuracy α=0.1 (%)",
                       "natural accuracy α=0.4 (%)", "seeds"]
    assert [fmt.format_map(ebm) for _, fmt in table.columns([0.1, 0.4])][1:5] == [
        "3.0 ± 1.4", "50.0 ± 0.0", "94.0 ± 1.4", "90.0 ± 0.0"]


def test_bad_alpha_is_refused_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match=r"--alphas \[1.5\]"):
        table.main(["--out", str(tmp_path), "--alphas", "0.1", "1.5"])
    assert not any(tmp_path.iterdir())


def test_toy_table_runs_each_alpha_and_defence_and_reuses_finished_runs(tmp_path, monkeypatch):
    """Two α × undefended/PureEBM × one seed under smoke=true: every run trains on its own α (its saved config), the
    record holds both rows with per-seed values, and a second invocation reuses all four runs."""
    monkeypatch.setenv("LIT_ROBUST_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    argv = ["--out", str(tmp_path / "out"), "--seeds", "0", "--alphas", "0.1", "0.3", "--run", "undefended=logo_digits",
            "--run", "PureEBM=pureebm_logo_digits", "--set", "smoke=true"]
    record = json.loads(table.main(argv).read_text())
    assert [row["name"] for row in record["rows"]] == ["undefended", "PureEBM"]
    for row in record["rows"]:
        for key in ("asr_a10", "asr_a30", "natural_acc_a10", "natural_acc_a30"):
            assert len(row[f"{key}_per_seed"]) == 1 and 0 <= row[f"{key}_mean"] <= 100
    config = json.loads((tmp_path / "out" / "alpha0.3" / "PureEBM" / "seed0" / "resolved_config.json").read_text())
    assert config["data"]["params"]["alpha"] == 0.3 and config["data"]["attack"] == "logo"
    assert "callbacks/purification.py" in record["depends_on"]
    assert "conf/experiment/pureebm_logo_digits.yaml" in record["depends_on"]
    again = json.loads(table.main(argv).read_text())
    assert all(run["reused"] for run in again["runs"].values()) and len(again["runs"]) == 4
