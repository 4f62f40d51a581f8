"""Causal structural hypothesis testing (thesis 000 ch. 4, App. B), two tables:

- ``cshtest_pendulum`` (Table B.1): CSHTEST and CSVHTEST on the tabular pendulum (``experiment=cshtest_pendulum`` /
  ``csvhtest_pendulum``: N 2,000, shadow at 10 dB SNR, standardised), every hypothesis × 10 seeds in one fit per
  split — deliberate (trained below the 75 % quantile of the sun angle, or of the shadow position, tested above it)
  and random (80 / 20). Per hypothesis: its Hamming distances to the truth and its test loss, mean ± std over seeds,
  and that loss over the truth's. Beside them the NN and VAE baselines (``BottleneckAutoencoder``: all four
  variables through a 2-wide code, 4→16→2→16→4; their loss over CSHTEST's truth).
- ``cshtest_dags`` (Eq. 4.6, Figs. 4.4 / B.1): random linear DAGs with 4 nodes and 4 edges (``experiment=
  cshtest_dags``; 5 / 5 with ``--only dags55``), SNR ∞ and 5 dB, 10 DAGs each, the truth beside 5 hypotheses per
  Hamming distance 1–4, one fit per deliberate split on each node (N 100, η nets [4, 4], 100 epochs, one seed).
  Per (H, H⁺, H⁻): how often the truth's test loss is below the hypothesis', and in the last rows, over all pairs of
  one fit where one hypothesis is closer to the truth and has fewer removed edges, how often the closer one wins.

Written to ``<out>/<table>.json`` (``benchmarks/records.py``); ``render_results.py`` puts them into
``docs/causal_structure.md``. Extra arguments are Hydra overrides for every fit.

    OMP_NUM_THREADS=1 python benchmarks/cshtest_table.py --out docs/records [--only pendulum dags44]
"""
from __future__ import annotations

import itertools
from collections import defaultdict

import torch
from causal_fits import composed, fit, split_rows
from records import TableRecord, table_arguments

from lit_robust.functional.causal_structure import adjacency_from, hamming_distances, pair_win_probability
from lit_robust.functional.structural_equations import perturbed_dags, random_dag

PENDULUM_SPLITS = {"sun 75 %": ["data.split=deliberate", "data.split_column=sun"],
                   "shadow x 75 %": ["data.split=deliberate", "data.split_column=shadow_position"],
                   "random": ["data.split=random"]}
CAUSAL = ["lit_robust/models/cshtest.py", "lit_robust/models/node_nets.py", "lit_robust/functional/causal_structure.py",
          "lit_robust/functional/structural_equations.py", "datamodules/tabular.py", "benchmarks/causal_fits.py"]
PENDULUM_DEPENDS_ON = [*CAUSAL, "datamodules/pendulum.py", "conf/experiment/cshtest_pendulum.yaml",
                       "conf/experiment/csvhtest_pendulum.yaml"]
DAGS_DEPENDS_ON = [*CAUSAL, "conf/experiment/cshtest_dags.yaml"]
RUNS = {"pendulum": None, "dags44": (4, 4), "dags55": (5, 5)}
NUM_DAGS, PER_DISTANCE, DISTANCES, SNRS = 10, 5, (1, 2, 3, 4), (None, 5.0)


def test_losses(experiment: str, overrides: list[str], record: TableRecord, name: str,
                edit=None) -> torch.Tensor:
    """(hypotheses, seeds) test losses of one fit of ``experiment`` (``edit`` changes the composed config)."""
    config = composed(experiment, overrides)
    if edit is not None:
        edit(config)
    data, model, seconds = fit(config)
    record.add_config(name, config)
    record.add_run(name, seconds=round(seconds, 1))
    with torch.no_grad():
        return model.per_model_loss(split_rows(data, "test")).view(len(model.names), -1)


def baseline(variational: bool):
    """Replace the composed config's model by the NN (autoencoder) or VAE baseline of the same data."""
    def edit(config):
        config["model"] = {"_target_": "lit_robust.models.cshtest.BottleneckAutoencoder", "num_variables": 4,
                           "bottleneck": 2, "hidden": [16], "variational": variational, "replicas": 10,
                           "lr": config["model"]["lr"], "seed": config["seed"]}
    return edit


def pendulum_rows(record: TableRecord, extra: list[str]) -> list[dict]:
    """Per method and hypothesis (or baseline): test loss per split, mean ± std over 10 seeds, and over the truth's."""
    rows, truth_loss = [], {}
    methods = [("CSHTEST", "cshtest_pendulum", None), ("CSVHTEST", "csvhtest_pendulum", None),
               ("NN", "cshtest_pendulum", baseline(False)), ("VAE", "cshtest_pendulum", baseline(True))]
    for method, experiment, edit in methods:
        config = composed(experiment, [])["model"]
        truth = adjacency_from(config["nodes"], config["hypotheses"]["truth"])
        cells = {split: test_losses(experiment, ["model.replicas=10", *overrides, *extra], record,
                                    f"{method}/{split}", edit) for split, overrides in PENDULUM_SPLITS.items()}
        groups = {"4→16→2→16→4": None} if edit else config["hypotheses"]
        for k, (hypothesis, edges) in enumerate(groups.items()):
            row = {"name": f"{method}/{hypothesis}", "method": method, "hypothesis": hypothesis}
            if edges is not None:
                row |= hamming_distances(adjacency_from(config["nodes"], edges), truth)
            for column, (split, losses) in zip(("sun", "shadow", "random"), cells.items()):
                if edit is None:
                    truth_loss[(method, column)] = losses[0].mean()
                reference = truth_loss[("CSHTEST" if edit else method, column)]   # baselines: over CSHTEST's truth
                row |= {column: losses[k].mean().item(), f"{column}_std": losses[k].std().item(),
                        f"{column}_ratio": (losses[k].mean() / reference).item()}
            rows.append(row)
    return rows


def dag_fits(size: tuple[int, int], record: TableRecord, extra: list[str]):
    """Per fit: (Hamming distances of every hypothesis to the truth, their test losses); the truth is first."""
    nodes = [f"x{i}" for i in range(size[0])]
    for snr, dag_seed in itertools.product(SNRS, range(NUM_DAGS)):
        truth = (random_dag(*size, torch.Generator().manual_seed(dag_seed)) != 0).float()
        generator = torch.Generator().manual_seed(1000 + dag_seed)
        hypotheses = [truth] + [h for distance in DISTANCES for h in perturbed_dags(truth, distance, PER_DISTANCE,
                                                                                   generator)]
        exogenous = [name for name, is_root in zip(nodes, ~truth.bool().any(0)) if is_root]

        def edit(config, column=None):
            config["data"] |= {"num_nodes": size[0], "num_edges": size[1], "snr_db": snr, "dag_seed": dag_seed,
                               "split_column": column}
            config["model"] |= {"nodes": nodes, "exogenous": exogenous, "replicas": 1,
                                "hypotheses": {f"h{k}": h.int().tolist() for k, h in enumerate(hypotheses)}}
        for column in nodes:
            losses = test_losses("cshtest_dags", ["seed=1", *extra], record,
                                 f"dags{size[0]}{size[1]}/snr{snr}/dag{dag_seed}/{column}",
                                 lambda config: edit(config, column))[:, 0]
            yield [hamming_distances(h, truth) for h in hypotheses], losses, snr


def dag_rows(size: tuple[int, int], record: TableRecord, extra: list[str]) -> list[dict]:
    """Eq. 4.6 per (SNR, H, H⁺, H⁻) of the truth against each hypothesis, then over all closer-and-less-lossy pairs."""
    wins, pairs = defaultdict(list), defaultdict(lambda: [0.0, 0])
    for distances, losses, snr in dag_fits(size, record, extra):
        snr_name = "∞" if snr is None else f"{snr:g} dB"
        for k, distance in enumerate(distances[1:], start=1):
            key = (snr_name, distance["H"], distance["H+"], distance["H-"])
            wins[key].append(pair_win_probability(losses, torch.tensor([0]), torch.tensor([k])).item())
        closer, farther = map(torch.tensor, zip(*[
            (a, b) for a, b in itertools.permutations(range(len(distances)), 2)
            if distances[a]["H"] < distances[b]["H"] and distances[a]["H-"] < distances[b]["H-"]]))
        pairs[snr_name][0] += pair_win_probability(losses, closer, farther).item() * len(closer)
        pairs[snr_name][1] += len(closer)
    dag = f"({size[0]}, {size[1]})"
    rows = [{"name": f"dags{size[0]}{size[1]}/{snr}/H{h}+{leaky}-{lossy}", "dag": dag, "snr": snr,
             "pair": f"truth vs (H {h}, H⁺ {leaky}, H⁻ {lossy})", "p_win": sum(v) / len(v), "n": len(v)}
            for (snr, h, leaky, lossy), v in sorted(wins.items())]
    rows += [{"name": f"dags{size[0]}{size[1]}/{snr}/closer_vs_lossier", "dag": dag, "snr": snr,
              "pair": "all pairs: closer and less lossy vs the other", "p_win": total / count, "n": count}
             for snr, (total, count) in pairs.items()]
    return rows


def main() -> None:
    args, extra, out = table_arguments(__doc__, "docs/records", RUNS)
    if "pendulum" in args.only:
        record = TableRecord("cshtest_pendulum", depends_on=PENDULUM_DEPENDS_ON,
                             title="CSHTEST / CSVHTEST on the tabular pendulum (Table B.1)")
        columns = [("method", "{method}"), ("hypothesis", "{hypothesis}"), ("H", "{H}"), ("H⁺", "{H+}"),
                   ("H⁻", "{H-}")] + [(f"{title} test loss (× truth)", f"{{{key}:.3f}} ± {{{key}_std:.3f}} "
                                       f"({{{key}_ratio:.2f}})") for title, key in
                                      (("sun 75 %", "sun"), ("shadow x 75 %", "shadow"), ("random", "random"))]
        print(record.write(out, columns, pendulum_rows(record, extra)))
    for name in [name for name in args.only if name.startswith("dags")]:
        record = TableRecord(f"cshtest_{name}", depends_on=DAGS_DEPENDS_ON,
                             title=f"CSHTEST pair wins on random {RUNS[name]} linear DAGs (Eq. 4.6)")
        columns = [("DAG", "{dag}"), ("SNR", "{snr}"), ("pair", "{pair}"), ("Pr(closer wins)", "{p_win:.2f}"),
                   ("pairs", "{n}")]
        print(record.write(out, columns, dag_rows(RUNS[name], record, extra)))


if __name__ == "__main__":
    main()
