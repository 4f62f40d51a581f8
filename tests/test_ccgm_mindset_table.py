"""benchmarks/ccgm_mindset_table.py at toy size: on Mindset-style data with strong known confounding by SE, the
CCGM regeneration reproduces the naive ATE, and cutting SE → D and SE → Y brings it to the true τ."""
from __future__ import annotations

import torch
from causal_fits import composed, fit

import ccgm_mindset_table as table

STRONG = "{SM-SE:0.0,SM-D:0.0,SM-Y:0.0,SE-D:0.3,SE-Y:0.6,D-Y:0.4}"   # naive ATE ≈ τ + 0.23


def test_cutting_the_confounders_edges_brings_the_generated_ate_to_tau(tmp_path):
    config = composed("ccgm_mindset", ["data.n_samples=2000", f"data.correlations={STRONG}", "trainer.max_epochs=15",
                                       "model.replicas=1"])
    data, model, _ = fit(config)
    ates = {name: sum(values) / len(values)
            for name, values in table.bootstrap_ates(data, model, 5, torch.Generator().manual_seed(0)).items()}
    tau = data.tau
    assert ates["naive"] - tau > 0.15                                  # the toy is confounded
    assert abs(ates["ccgm"] - ates["naive"]) < 0.08                    # the causal layer regenerates the data
    assert abs(ates["ccgm_debias_se"] - tau) < 0.06                    # the cut removes SE's bias
    assert abs(ates["ccgm_debias_se"] - tau) < abs(ates["naive"] - tau)
    assert abs(ates["ipw"] - tau) < 0.1 and abs(ates["aipw"] - tau) < 0.1
    rows = table.table_rows({name: [value, value + 0.01] for name, value in ates.items()}, tau)
    assert [row["name"] for row in rows] == list(table.ESTIMATORS) and len(rows[0]["ate_per_seed"]) == 2
