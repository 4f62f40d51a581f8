"""SCNN (thesis 000 §2.3): each sub-network sees only its parents, the chain reads only the inputs, η = 1 trains
only the local losses, η = 0 only the global one, and a short fit learns an observed node from its parents."""
from __future__ import annotations

import pytest
import torch

from lit_robust.functional.structural_equations import SCNN_EDGES, SCNN_NODES, sample_scnn_sem
from lit_robust.models.scnn import SCNN

EDGES = [list(edge) for edge in SCNN_EDGES]


def scnn(**kwargs) -> SCNN:
    return SCNN(SCNN_NODES, EDGES, ["C", "T"], "Y", **kwargs)


def rows(n: int = 16) -> torch.Tensor:
    return sample_scnn_sem("linear", n, torch.Generator().manual_seed(0))


def test_a_node_gets_exactly_zero_gradient_from_every_non_parent_input():
    model, x = scnn(), rows().requires_grad_()
    predictions = model.nets(x)[0]
    parents = {"E": {"C", "T"}, "TQ": {"T"}, "P": {"E", "C"}, "Y": {"P", "E", "TQ"}}
    for node, its_parents in parents.items():
        grad = torch.autograd.grad(predictions[:, SCNN_NODES.index(node)].sum(), x, retain_graph=True)[0]
        for column, name in enumerate(SCNN_NODES):
            if name in its_parents:
                assert grad[:, column].abs().sum() > 0, f"{node} does not read its parent {name}"
            else:
                assert torch.equal(grad[:, column], torch.zeros(len(x))), f"{node} reads non-parent {name}"


def test_the_chain_reads_only_the_inputs():
    model, x = scnn(), rows().requires_grad_()
    target = model.chained(x)[0][:, SCNN_NODES.index("Y")]
    grad = torch.autograd.grad(target.sum(), x)[0]
    assert grad[:, :2].abs().sum() > 0 and torch.equal(grad[:, 2:], torch.zeros(len(x), 4))


@pytest.mark.parametrize("eta, uses", [(1.0, "local"), (0.0, "global")])
def test_eta_picks_which_losses_train(eta, uses):
    model, x = scnn(etas=[eta]), rows()
    params = list(model.nets.parameters())
    global_loss, local_loss = model.losses(x)
    mixed = torch.autograd.grad(model.training_loss(x), params, allow_unused=True)
    alone = torch.autograd.grad((local_loss if uses == "local" else global_loss).sum(), params)
    other = torch.autograd.grad((global_loss if uses == "local" else local_loss).sum(), params)
    for got, expected, absent in zip(mixed, alone, other):
        assert torch.allclose(got, expected)
    assert any(g.abs().sum() > 0 for g in other)   # the other loss would have moved the weights


def test_models_of_one_seed_start_equal_across_etas():
    model = scnn(etas=[0.0, 0.5, 1.0], replicas=2)
    first = model.nets.weights[0]
    assert torch.equal(first[0], first[2]) and torch.equal(first[0], first[4]) and not torch.equal(first[0], first[1])


def test_local_training_learns_the_observed_node_and_ground_truth_error_follows():
    model, x = scnn(etas=[0.0, 1.0], ground_truth="linear"), rows(500)
    before = model.ground_truth_errors()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):
        optimizer.zero_grad()
        model.training_loss(x).backward()
        optimizer.step()
    after = model.ground_truth_errors()
    tq = model.endogenous.index(SCNN_NODES.index("TQ"))
    assert after[1, tq] < 0.05 * before[1, tq]   # η = 1 learns TQ = 2T from the observed TQ
    assert after[1, tq] < 0.1 * after[0, tq]     # η = 0 has no reason to


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="etas"):
        scnn(etas=[1.5])
    with pytest.raises(ValueError, match="Z"):
        SCNN(SCNN_NODES, EDGES, ["C", "Z"], "Y")
