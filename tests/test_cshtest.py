"""CSHTEST / CSVHTEST (thesis 000 ch. 4, App. B): S masks parents exactly, exogenous variables read themselves,
hypotheses of one seed start equal, a short fit ranks the true structure above a lossy one, and the tabular
DataModules split deliberately on the right side of the quantile."""
from __future__ import annotations

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

from lit_robust.datamodules.tabular import PendulumTableDataModule, RandomDAGDataModule
from lit_robust.functional.causal_structure import adjacency_from
from lit_robust.models.cshtest import BottleneckAutoencoder, CSHTest, CSVHTest

NODES = ["theta", "sun", "shadow_length", "shadow_position"]
TRUE = [["theta", "shadow_length"], ["theta", "shadow_position"], ["sun", "shadow_length"], ["sun", "shadow_position"]]
HYPOTHESES = {"true": TRUE, "lossy": TRUE[:3]}


def rows(n: int = 400) -> torch.Tensor:
    data = PendulumTableDataModule(n_samples=n, split="random", standardise=True)
    data.setup()
    return data.train_dataset.tensors[0]


def trained(model, steps: int = 150):
    """``model`` after ``steps`` full-batch Adam steps on 400 pendulum rows."""
    torch.manual_seed(0)
    x, optimizer = rows(), torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model.training_loss(x).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("cls", [CSHTest, CSVHTest])
def test_a_hypothesis_without_an_edge_cannot_use_that_input(cls):
    model, x = cls(NODES, HYPOTHESES, ["theta", "sun"]), rows(32).requires_grad_()
    position = model.nets(model.encoder(x) if cls is CSVHTest else x)[:, :, 3]
    grad_true, grad_lossy = (torch.autograd.grad(position[m].sum(), x, retain_graph=True)[0] for m in (0, 1))
    assert grad_true[:, 1].abs().sum() > 0                    # the truth's x reads the sun
    assert torch.equal(grad_lossy[:, 1], torch.zeros(len(x)))  # the lossy hypothesis' x cannot
    for model_grad in (grad_true, grad_lossy):                 # and neither reads the shadow columns
        assert torch.equal(model_grad[:, 2:], torch.zeros(len(x), 2))


def test_exogenous_variables_read_only_themselves_and_seeds_start_equal_across_hypotheses():
    model = CSHTest(NODES, HYPOTHESES, ["theta", "sun"], replicas=2)
    assert model.priors[0, :2].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    first = model.nets.weights[0]
    assert torch.equal(first[0], first[2]) and not torch.equal(first[0], first[1])


@pytest.mark.parametrize("cls", [CSHTest, CSVHTest])
def test_a_short_fit_ranks_the_true_structure_above_the_lossy_one(cls):
    model, x = trained(cls(NODES, HYPOTHESES, ["theta", "sun"], replicas=2)), rows()
    true_loss, lossy_loss = model.per_model_loss(x).detach().view(2, -1).mean(1)
    assert true_loss < 0.6 * lossy_loss


def test_bad_hypotheses_are_named():
    with pytest.raises(ValueError, match="moon"):
        CSHTest(NODES, HYPOTHESES, ["moon"])
    with pytest.raises(ValueError, match="moon"):
        CSHTest(NODES, {"bad": [["moon", "sun"]]}, ["theta"])


@pytest.mark.parametrize("quantile", [0.75, 0.25])
def test_deliberate_pendulum_split_tests_beyond_the_quantile_and_standardises_on_training_rows(quantile):
    data = PendulumTableDataModule(n_samples=400, split="deliberate", split_column="sun", split_quantile=quantile,
                                   standardise=True)
    data.setup()
    train, val, test = (getattr(data, f"{s}_dataset").tensors[0][:, 1] for s in ("train", "val", "test"))
    assert len(train) + len(val) == 300 and len(test) == 100
    inside = torch.cat([train, val])
    assert (inside.max() < test.min()) if quantile > 0.5 else (inside.min() > test.max())
    assert abs(train.mean().item()) < 0.15 and train.std().item() == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ValueError, match="moon"):
        PendulumTableDataModule(split="deliberate", split_column="moon")


def test_random_dag_data_follow_the_dag_weights():
    data = RandomDAGDataModule(num_nodes=4, num_edges=4, snr_db=None, dag_seed=1)
    data.setup()
    x = torch.cat([data.train_dataset.tensors[0], data.test_dataset.tensors[0]])
    children = (data.weights != 0).any(0)
    assert children.any() and torch.allclose((x @ data.weights)[:, children], x[:, children], atol=1e-5)


def test_the_dag_experiments_true_hypothesis_is_its_datas_dag():
    config = OmegaConf.load(REPO / "conf" / "experiment" / "cshtest_dags.yaml")
    data = RandomDAGDataModule(num_nodes=4, num_edges=4, dag_seed=0)
    truth = adjacency_from(list(config.model.nodes), OmegaConf.to_container(config.model.hypotheses.truth))
    assert torch.equal(truth, (data.weights != 0).float())


@pytest.mark.parametrize("variational", [False, True])
def test_the_autoencoder_baseline_is_limited_by_its_bottleneck(variational):
    x = rows(200)
    losses = {}
    for bottleneck in (1, 4):
        torch.manual_seed(0)
        model = BottleneckAutoencoder(4, bottleneck=bottleneck, variational=variational, replicas=2, kl_weight=0.0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            optimizer.zero_grad()
            model.training_loss(x).backward()
            optimizer.step()
        losses[bottleneck] = model.per_model_loss(x).detach()
        assert losses[bottleneck].shape == (2,)
    assert losses[4].max() < 0.5 * losses[1].min()


def test_a_cut_edge_stops_the_child_from_moving_and_leaves_the_other_child_alone():
    model, x = trained(CSHTest(NODES, {"truth": TRUE}, ["theta", "sun"]), steps=50), rows(32)
    swept = x.clone()
    swept[:, 0] += 1.0                                          # do(θ + 1)
    cut = model.without_edges([["theta", "shadow_position"]])
    with torch.no_grad():
        moved, moved_cut = ((m.reconstruction(swept) - m.reconstruction(x))[0] for m in (model, cut))
    assert moved[:, 3].abs().mean() > 0.05 and torch.equal(moved_cut[:, 3], torch.zeros(len(x)))
    assert torch.equal(moved_cut[:, 2], moved[:, 2])            # the width still follows θ
    assert model.nets.masks[0, 3, 0] == 1                          # the cut is made on a copy


def test_generation_feeds_children_their_generated_parents_and_keeps_the_exogenous_columns():
    # a chain theta → shadow_length → shadow_position: one reconstruction pass would read the observed length
    chain = {"chain": [["theta", "shadow_length"], ["shadow_length", "shadow_position"]]}
    model, x = CSHTest(NODES, chain, ["theta", "sun"], seed=3), rows(100)[:32]
    noise = 0.1 * torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        generated = model.generate(x, noise)[0]
        length = model.nets(torch.cat([x[:, :2], generated[:, 2:]], 1))[0]
    assert torch.equal(generated[:, :2], x[:, :2])
    assert torch.allclose(generated[:, 2:], length[:, 2:] + noise[:, 2:], atol=1e-6)
    one_pass = model.reconstruction(x)[0] + noise
    assert (generated[:, 3] - one_pass[:, 3]).abs().max() > 1e-3   # the child saw the generated, not the observed
    binary = model.generate(x, noise, lambda rows: rows.round())[0]
    assert torch.equal(binary[:, 2:], binary[:, 2:].round())
