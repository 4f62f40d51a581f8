"""The multi-seed purification table: means, sample std and the thesis bounds against the undefended run."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "purification_seeds", Path(__file__).resolve().parents[1] / "benchmarks" / "purification_seeds.py")
purification_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(purification_seeds)


def metrics(x1, x3, acc):
    return {"poison/asr_x1": x1, "poison/asr_x3": x3, "poison/natural_acc": acc}


def test_summary_means_std_and_bounds():
    per_seed = {"undefended": {0: metrics(0.6, 1.0, 0.98), 1: metrics(0.8, 0.9, 0.96)},
                "PureEBM": {0: metrics(0.0, 0.1, 0.97), 1: metrics(0.2, 0.1, 0.93)}}
    s = purification_seeds.summarise(per_seed)
    assert s["table/undefended/asr_x1/mean"] == pytest.approx(0.7)
    assert s["table/undefended/asr_x1/std"] == pytest.approx(0.1414213562)
    assert s["table/PureEBM/natural_acc/seed1"] == 0.93 and s["table/PureEBM/asr_x3/n"] == 2
    assert s["bounds/PureEBM/asr_x1_fraction_of_undefended"] == pytest.approx(0.1 / 0.7)
    assert s["bounds/PureEBM/asr_x3_fraction_of_undefended"] == pytest.approx(0.1 / 0.95)
    assert s["bounds/PureEBM/natural_acc_drop"] == pytest.approx(0.02)
    assert not any(key.startswith("bounds/undefended") for key in s)


def test_table_rows_carry_the_per_seed_values_of_each_mean():
    """A record's mean comes with the values it averages, in seed order (records.TableRecord refuses it otherwise)."""
    per_seed = {"undefended": {1: metrics(0.8, 0.9, 0.96), 0: metrics(0.6, 1.0, 0.98)}}
    _, rows = purification_seeds.table_rows(per_seed, purification_seeds.summarise(per_seed))
    assert rows[0]["asr_x1_per_seed"] == pytest.approx([60.0, 80.0])
    assert rows[0]["natural_acc_per_seed"] == pytest.approx([98.0, 96.0])
    assert rows[0]["asr_x1_mean"] == pytest.approx(70.0)


def test_run_spec_with_overrides():
    assert purification_seeds.parse_run("P=pureebm_narcissus_digits:a.b=1:c=x") == (
        "P", "pureebm_narcissus_digits", ["a.b=1", "c=x"])
    with pytest.raises(SystemExit, match="name=experiment"):
        purification_seeds.parse_run("pureebm_narcissus_digits")


def test_targeted_attacks_report_success_without_bounds_against_zero():
    per_seed = {"undefended": {0: {"poison/target_success": 0.0, "poison/natural_acc": 0.98}},
                "PureEBM": {0: {"poison/target_success": 1.0, "poison/natural_acc": 0.97}}}
    s = purification_seeds.summarise(per_seed)
    assert s["table/PureEBM/target_success/mean"] == 1.0 and "table/PureEBM/asr_x1/mean" not in s
    assert "bounds/PureEBM/target_success_fraction_of_undefended" not in s  # 0 undefended: no ratio
    assert s["bounds/PureEBM/natural_acc_drop"] == pytest.approx(0.01)
