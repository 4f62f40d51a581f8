"""Generic deep CAMA on measurement rows [a, c, x] (seed 002 §3.2, §4.2): the data's label rule and co-parent shift,
the networks reading exactly the variables of Eqs. 9–10, Eq. 11's prior p(y|a) in the prediction, the dense DNN on
rows, and the table script's helpers."""
from __future__ import annotations

import math

import pytest
import torch

import deep_cama_vectors_table as table
from lit_robust.datamodules.tabular import MeasurementDataModule
from lit_robust.functional.structural_equations import measurement_children, measurement_labels
from lit_robust.models.measurement_classifier import MeasurementClassifier
from lit_robust.models.deep_cama import DeepCAMA

A, C, X = slice(0, 5), slice(5, 10), slice(10, 20)


def tiny(**kwargs) -> DeepCAMA:
    torch.manual_seed(0)
    return DeepCAMA(num_classes=5, parent_dim=5, coparent_dim=5, child_dim=10, dim_z=3, dim_m=2, hidden=16, **kwargs)


def data(**kwargs) -> MeasurementDataModule:
    module = MeasurementDataModule(n_samples=200, val_size=20, test_size=80, seed=1, **kwargs)
    module.setup()
    return module


def test_labels_are_the_argmax_of_the_quadratic_of_the_parents():
    a = torch.tensor([[0.0, -1.0, 3.0, 1.0, 0.5], [2.0, 2.0, 2.0, -0.5, 5.0]])
    # g = 0.2a² − 0.8a: row 0 → [0, 1.0, −0.6, −0.6, −0.35]; row 1 → [−0.8, −0.8, −0.8, 0.45, 1.0]
    assert measurement_labels(a, torch.zeros_like(a)).tolist() == [1, 4]
    rows, labels = data(label_noise_std=0.0).train_dataset.tensors
    assert torch.equal(labels, (0.2 * rows[:, A] ** 2 - 0.8 * rows[:, A]).argmax(-1))
    assert rows.shape[1] == 20 and len(labels.unique()) == 5
    noisy = data(label_noise_std=1.0).train_dataset.tensors
    agree = (noisy[1] == (0.2 * noisy[0][:, A] ** 2 - 0.8 * noisy[0][:, A]).argmax(-1)).float().mean()
    assert 0.3 < agree < 0.95                       # σ_Y = 1: A informs Y without deciding it


def test_children_are_quadratic_in_label_and_coparents():
    module = data()
    y, c = torch.tensor([0, 3]), torch.tensor([[0.5] * 5, [-1.0] * 5])
    v = torch.cat([torch.nn.functional.one_hot(y, 5).float(), c], 1)
    expected = v @ module.mechanism["linear"] + (v @ module.mechanism["quadratic"]) ** 2
    assert torch.allclose(measurement_children(module.mechanism, y, c), expected)
    doubled = measurement_children(module.mechanism, y, 2 * c) - measurement_children(module.mechanism, y, 0 * c)
    assert not torch.allclose(doubled, 2 * (measurement_children(module.mechanism, y, c)
                                            - measurement_children(module.mechanism, y, 0 * c)))   # not linear in c


def test_the_coparent_shift_moves_c_and_x_of_the_same_test_units_only():
    module = data()
    clean, shifted = module.shifted_test(0.0).tensors, module.shifted_test(1.5).tensors
    assert torch.equal(clean[0], module.test_dataset.tensors[0])
    assert torch.equal(shifted[1], clean[1]) and torch.equal(shifted[0][:, A], clean[0][:, A])
    assert torch.allclose(shifted[0][:, C] - clean[0][:, C], torch.full((80, 5), 1.5))
    assert (shifted[0][:, X] - clean[0][:, X]).abs().mean() > 0.1
    configured = data(coparent_offset=1.5)
    assert torch.equal(configured.test_dataset.tensors[0], shifted[0])
    assert torch.equal(configured.train_dataset.tensors[0], module.train_dataset.tensors[0])   # training unshifted
    with pytest.raises(ValueError, match="val_size=150"):
        MeasurementDataModule(n_samples=200, val_size=150, test_size=80)


def test_each_network_reads_the_variables_of_eqs_9_and_10():
    """p(x|y,c,z,m) reads y and c but not a; q(z|x,y,m,a,c) reads the whole row and y; q(m|x) reads x only; p(y|a)
    reads a only. Intervening on a column changes exactly the outputs that should depend on it."""
    model, rows = tiny().eval(), torch.randn(6, 20)
    y, other_y = torch.eye(5)[[0] * 6], torch.eye(5)[[3] * 6]
    z, m = torch.randn(6, 3), torch.randn(6, 2)

    def outputs(r, labels):
        return {"decoder": model.decoder(labels, z, m, r), "q_z": model.q_z.head(model.q_z.features(r), labels, m)[0],
                "q_m": model.q_m(r)[0], "prior": model.prior(labels, r)}

    def changed(r, labels=y):
        before, after = outputs(rows, y), outputs(r, labels)
        return {name for name in before if not torch.allclose(before[name], after[name])}

    with torch.no_grad():
        for columns, expected in ((A, {"q_z", "prior"}), (C, {"decoder", "q_z"}), (X, {"q_z", "q_m"})):
            intervened = rows.clone()
            intervened[:, columns] += 1.0
            assert changed(intervened) == expected, columns
        assert changed(rows, other_y) == {"decoder", "q_z", "prior"}


def test_the_prior_p_y_given_a_enters_the_bayes_prediction():
    """Eq. 11: p(y|a,x,c) ∝ p(y|a) p(x|y,c); favouring class 2 in p(y|a) by 50 nats makes every prediction 2."""
    model, rows = tiny().eval(), torch.randn(8, 20)
    with torch.no_grad():
        before = model.predict_log_probs(rows, num_samples=4)
        model.prior.net[-1].bias[2] += 50.0
        after = model.predict_log_probs(rows, num_samples=4)
    assert (after.argmax(-1) == 2).all() and not (before.argmax(-1) == 2).all()
    assert torch.allclose(after.exp().sum(-1), torch.ones(8), atol=1e-5)


def test_elbo_of_rows_is_the_gaussian_likelihood_plus_prior_minus_kl(monkeypatch):
    from lit_robust.models import deep_cama
    monkeypatch.setattr(deep_cama, "reparameterise", lambda mean, logvar: mean)
    model, rows, labels = tiny().eval(), torch.randn(4, 20), torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        onehot, m = torch.eye(5)[labels], torch.zeros(4, 2)
        z_mean, z_logvar = model.q_z.head(model.q_z.features(rows), onehot, m)
        mean = model.decoder(onehot, z_mean, m, rows)
        variance = model.decoder.logvar.exp()
        log_px = (-0.5 * (math.log(2 * math.pi) + variance.log() + (rows[:, X] - mean) ** 2 / variance)).sum(-1)
        log_py = torch.log_softmax(model.prior.net(rows[:, A]), -1)[torch.arange(4), labels]
        kl = 0.5 * (z_mean ** 2 + z_logvar.exp() - 1 - z_logvar).sum(-1)
        assert torch.allclose(model.intervention_elbo(rows, labels), log_px + log_py - kl, atol=1e-4)


def test_bad_rows_and_settings_name_the_fix():
    with pytest.raises(ValueError, match="parent_dim/coparent_dim/child_dim"):
        tiny().predict_log_probs(torch.randn(2, 19))
    with pytest.raises(ValueError, match="augment_shift=2"):
        tiny(augment_shift=2)
    with pytest.raises(ValueError, match="child_dim > 0"):
        DeepCAMA(parent_dim=5)


def test_the_dense_dnn_classifies_rows_with_the_plain_mlp():
    torch.manual_seed(0)
    dnn = MeasurementClassifier(backbone="dense", num_classes=5, mean=[0.5], std=[2.0],
                                backbone_kwargs={"widths": [64, 16, 32], "drop_rates": [0.0] * 3, "in_features": 20}).eval()
    rows = torch.randn(7, 20)
    linears = [m for m in dnn.net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(20, 64), (64, 16), (16, 32), (32, 5)]
    with torch.no_grad():
        assert torch.allclose(dnn(rows), dnn.net((rows - 0.5) / 2.0)) and dnn(rows).shape == (7, 5)


def test_the_table_reports_each_models_accuracy_per_shift_and_seed():
    module = data(label_noise_std=0.0)

    class ParentsRule(torch.nn.Module):     # decides Y from A alone: a C shift cannot move it
        def forward(self, rows):
            return 0.2 * rows[:, A] ** 2 - 0.8 * rows[:, A]

    class CoparentRule(ParentsRule):        # the same plus a pull towards class 0 by C: a shift changes its answers
        def forward(self, rows):
            return super().forward(rows) + rows[:, C] * torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0])

    invariant = table.shifted_accuracies(ParentsRule(), module, (0.0, 2.0))
    assert invariant == {0.0: 100.0, 2.0: 100.0}
    moved = table.shifted_accuracies(CoparentRule(), module, (0.0, 2.0))
    assert moved[2.0] < moved[0.0] - 10
    rows = table.table_rows({"rule": [invariant, moved]}, (0.0, 2.0))
    assert [row["acc_per_seed"] for row in rows] == [[100.0, moved[0.0]], [100.0, moved[2.0]]]
