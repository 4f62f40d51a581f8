"""CCGM label-to-label counterfactuals on the tabular pendulum (thesis 000 §3.6.2), with the structural layer of
CSHTEST under the true DAG (``experiment=cshtest_pendulum`` with only the ``truth`` hypothesis, a random 80 / 20
split, 5 seeds) standing in for CCGM's causal layer on labels: the labels are the latents (identity coders).

do(θ) (and do(sun)) sweeps 11 values over the training range on 200 test rows: the model's mean shadow length w and
position x against the renderer's equations (``pendulum.intervene``) — Pearson correlation of the two mean curves;
then the edge θ → x (sun → x) is cut (``CSHTest.without_edges``, no retraining) and the sweep repeated: how far x and
w still move, as a share of their movement before the cut, and how far the other exogenous factor moves, as a share
of its data range. Written to ``<out>/ccgm_label_to_label.json``; ``render_results.py`` puts it into
``docs/causal_structure.md``.

    OMP_NUM_THREADS=1 python benchmarks/ccgm_label_table.py --out docs/records
"""
from __future__ import annotations

import torch
from causal_fits import composed, fit, split_rows
from records import TableRecord, table_arguments

from lit_robust.datamodules.pendulum import FACTORS, intervene

DEPENDS_ON = ["lit_robust/models/cshtest.py", "lit_robust/models/node_nets.py", "lit_robust/functional/causal_structure.py",
              "datamodules/tabular.py", "datamodules/pendulum.py", "conf/experiment/cshtest_pendulum.yaml",
              "benchmarks/causal_fits.py"]
SWEEPS = {"theta": "sun", "sun": "theta"}   # the factor swept → the other exogenous factor, which must not move
W, X = FACTORS.index("shadow_length"), FACTORS.index("shadow_position")


def sweep(model, rows: torch.Tensor, factor: int, values: torch.Tensor) -> torch.Tensor:
    """(M, values, D) mean reconstructions of ``rows`` with column ``factor`` set to each value."""
    curves = []
    for value in values:
        swept = rows.clone()
        swept[:, factor] = value
        with torch.no_grad():
            curves.append(model.reconstruction(swept).mean(1))
    return torch.stack(curves, dim=1)


def renderer_sweep(data, rows: torch.Tensor, name: str, values: torch.Tensor) -> torch.Tensor:
    """(values, D) the renderer's mean factors under do(name = value), standardised like the data."""
    factors = rows * data.std + data.mean
    return torch.stack([((intervene(factors, **{name: float(value * data.std[FACTORS.index(name)]
                                                            + data.mean[FACTORS.index(name)])}) - data.mean)
                         / data.std).mean(0) for value in values])


def correlation(curves: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each model's curve (M, V) with the reference curve (V,), averaged over models."""
    centred, ref = curves - curves.mean(1, keepdim=True), reference - reference.mean()
    return ((centred * ref).sum(1) / (centred.norm(dim=1) * ref.norm()).clamp_min(1e-12)).mean()


def spread(curves: torch.Tensor) -> torch.Tensor:
    """How far each model's curve (M, V) moves across the sweep (max − min), averaged over models."""
    return (curves.max(1).values - curves.min(1).values).mean()


def main() -> None:
    args, extra, out = table_arguments(__doc__, "docs/records", {"pendulum": None})
    record = TableRecord("ccgm_label_to_label", depends_on=DEPENDS_ON,
                         title="Label-to-label do() sweeps and edge cuts on the pendulum")
    config = composed("cshtest_pendulum", ["data.split=random", "model.replicas=5", *extra])
    config["model"]["hypotheses"] = {"truth": config["model"]["hypotheses"]["truth"]}
    data, model, seconds = fit(config)
    record.add_config("truth", config)
    record.add_run("truth", seconds=round(seconds, 1))
    rows_in, train = split_rows(data, "test")[:200], split_rows(data, "train")
    table = []
    for name, other in SWEEPS.items():
        factor, other_index = FACTORS.index(name), FACTORS.index(other)
        values = torch.linspace(train[:, factor].min().item(), train[:, factor].max().item(), 11)
        reference = renderer_sweep(data, rows_in, name, values)
        before = sweep(model, rows_in, factor, values)
        after = sweep(model.without_edges([[name, "shadow_position"]]), rows_in, factor, values)
        data_range = train[:, other_index].max() - train[:, other_index].min()
        table.append({"name": name, "sweep": f"do({name})", "cut": f"{name} → shadow_position",
                      "corr_w": correlation(before[..., W], reference[:, W]).item(),
                      "corr_x": correlation(before[..., X], reference[:, X]).item(),
                      "x_kept": (100 * spread(after[..., X]) / spread(before[..., X])).item(),
                      "w_kept": (100 * spread(after[..., W]) / spread(before[..., W])).item(),
                      "other_moved": (100 * spread(after[..., other_index]) / data_range).item(), "other": other})
    columns = [("sweep", "{sweep}"), ("corr. with renderer: w", "{corr_w:.3f}"), ("x", "{corr_x:.3f}"),
               ("cut", "{cut}"), ("x moves (% of before)", "{x_kept:.1f}"), ("w moves (% of before)", "{w_kept:.1f}"),
               ("other exogenous moves (% of range)", "{other_moved:.2f} ({other})")]
    print(record.write(out, columns, table))


if __name__ == "__main__":
    main()
