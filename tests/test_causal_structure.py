"""The pure causal-structure math: adjacency and priors, SHD on known pairs, the η loss mix, deliberate splits, the
pair-win probability, and the SEM samplers against their equations."""
from __future__ import annotations

import math

import pytest
import torch

from lit_robust.functional.causal_structure import (adjacency_from, deliberate_split, hamming_distances, mixed_loss,
                                                    pair_win_probability, structural_prior, topological_levels)
from lit_robust.functional.structural_equations import (SCNN_EDGES, SCNN_NODES, perturbed_dags, random_dag,
                                                        sample_linear_sem, sample_scnn_sem, scnn_sem,
                                                        scnn_verification_grid)

NODES = ["theta", "sun", "w", "x"]
TRUTH = [["theta", "w"], ["theta", "x"], ["sun", "w"], ["sun", "x"]]


def test_edge_list_and_matrix_give_the_same_adjacency_and_bad_edges_are_named():
    adjacency = adjacency_from(NODES, TRUTH)
    assert adjacency.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert torch.equal(adjacency_from(NODES, adjacency.tolist()), adjacency)
    with pytest.raises(ValueError, match="moon"):
        adjacency_from(NODES, [["moon", "x"]])
    with pytest.raises(ValueError, match="4×4"):
        adjacency_from(NODES, [[0, 1], [0, 0]])


def test_levels_follow_the_dag_and_a_cycle_is_refused():
    levels = topological_levels(adjacency_from(SCNN_NODES, [list(e) for e in SCNN_EDGES]))
    assert [[SCNN_NODES[i] for i in level] for level in levels] == [["C", "T"], ["E", "TQ"], ["P"], ["Y"]]
    with pytest.raises(ValueError, match="cycle"):
        topological_levels(adjacency_from(NODES, [["w", "x"], ["x", "w"]]))


def test_structural_prior_rows_select_parents_and_exogenous_selves():
    prior = structural_prior(adjacency_from(NODES, TRUTH), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert prior.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize("edges, expected", [
    (TRUTH, {"H": 0, "H+": 0, "H-": 0, "dH": 0}),
    (TRUTH + [["w", "x"]], {"H": 1, "H+": 1, "H-": 0, "dH": 1}),                                # leaky
    (TRUTH[:3], {"H": 1, "H+": 0, "H-": 1, "dH": -1}),                                          # lossy
    (TRUTH[:3] + [["w", "x"]], {"H": 2, "H+": 1, "H-": 1, "dH": 0}),                            # leak-loss
    ([TRUTH[1], TRUTH[2]], {"H": 2, "H+": 0, "H-": 2, "dH": -2}),                               # 2-lossy
])
def test_hamming_distances_of_known_pairs(edges, expected):
    assert hamming_distances(adjacency_from(NODES, edges), adjacency_from(NODES, TRUTH)) == expected


def test_eta_one_drops_the_global_gradient_and_eta_zero_the_local_one():
    global_loss, local_loss = torch.tensor(3.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    for eta, expected in ((1.0, (0.0, 1.0)), (0.0, (1.0, 0.0)), (0.25, (0.75, 0.25))):
        grads = torch.autograd.grad(mixed_loss(global_loss, local_loss, eta), (global_loss, local_loss))
        assert [g.item() for g in grads] == pytest.approx(expected)
    overflowed = torch.tensor(float("inf"), requires_grad=True)
    mixed_loss(overflowed, local_loss, 1.0).backward()
    assert overflowed.grad.item() == 0.0


@pytest.mark.parametrize("quantile", [0.75, 0.25])
def test_deliberate_split_trains_on_the_larger_side_of_the_quantile(quantile):
    values = torch.arange(100.0)
    inside = deliberate_split(values, quantile)
    assert 74 <= int(inside.sum()) <= 76
    if quantile > 0.5:
        assert values[inside].max() < values[~inside].min()
    else:
        assert values[inside].min() > values[~inside].max()
    with pytest.raises(ValueError, match="0.5"):
        deliberate_split(values, 0.5)


def test_pair_win_probability_counts_wins_of_the_closer_hypothesis_and_half_ties():
    losses = torch.tensor([0.1, 0.5, 0.5, 0.9])
    assert pair_win_probability(losses, torch.tensor([0, 1, 3]), torch.tensor([1, 2, 0])).item() == pytest.approx(0.5)


def test_scnn_sems_follow_their_equations():
    zero = torch.zeros(1)
    linear = scnn_sem("linear", zero + 0.1, zero + 0.2, lambda mean: zero + mean)
    assert linear.flatten().tolist() == pytest.approx([0.1, 0.2, 4.4, 0.4, 7.15, 24.325])
    e = 2 * 0.1 ** 3 + 0.2 ** 2
    p = 1.5 * math.sin(e) + 0.5 * math.sin(0.1) + 0.5
    nonlinear = scnn_sem("nonlinear", zero + 0.1, zero + 0.2, lambda mean: zero + mean)
    assert nonlinear.flatten().tolist() == pytest.approx([0.1, 0.2, e, 0.4, p, 1.5 * p ** 3 + 3 * math.exp(e) + 1.0])
    rows = sample_scnn_sem("linear", 20000, torch.Generator().manual_seed(0))
    c, t, e, tq, p, y = rows.T
    for residual, mean in ((e - 2 * c - t, 4.0), (tq - 2 * t, 0.0), (p - 1.5 * e - 0.5 * c, 0.5),
                           (y - 1.5 * p - 3 * e - tq, 0.0), (c, 0.0)):
        assert residual.mean().item() == pytest.approx(mean, abs=0.005)
        assert residual.std().item() == pytest.approx(0.1, rel=0.03)
    assert scnn_verification_grid("linear")[:, 0].unique().tolist() == pytest.approx(
        [-0.4 + 0.08 * k for k in range(11)], abs=1e-6)


def test_random_dag_and_linear_sem_are_acyclic_with_exact_noise_free_children():
    generator = torch.Generator().manual_seed(3)
    weights = random_dag(5, 5, generator)
    assert int((weights != 0).sum()) == 5 and len(topological_levels((weights != 0).float())) > 1
    values = sample_linear_sem(weights, 50, None, generator)
    children = (weights != 0).any(0)
    assert torch.allclose(values[:, children], (values @ weights)[:, children], atol=1e-5)
    noisy = sample_linear_sem(weights, 4000, 5.0, generator)
    child = int(children.nonzero()[0])
    signal = noisy @ weights[:, child]
    assert (signal.var() / (noisy[:, child] - signal).var()).item() == pytest.approx(10 ** 0.5, rel=0.15)


def test_perturbed_dags_sit_at_the_asked_distance_and_stay_acyclic():
    truth = (random_dag(5, 5, torch.Generator().manual_seed(1)) != 0).float()
    hypotheses = perturbed_dags(truth, 2, 5, torch.Generator().manual_seed(2))
    assert len({tuple(h.flatten().tolist()) for h in hypotheses}) == 5
    for hypothesis in hypotheses:
        assert hamming_distances(hypothesis, truth)["H"] == 2
        topological_levels(hypothesis)
        assert not (hypothesis.bool().any(0) & ~truth.bool().any(0)).any()   # the truth's roots stay roots
