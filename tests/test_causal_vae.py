"""CausalVAE / CCGM: the causal layer's equations and that interventions reach children only."""
import json

import pytest
import torch

from lit_robust.datamodules import pendulum
from lit_robust.models.causal_vae import (CONCEPTS, FACTOR_HIGH, FACTOR_LOW, TRUE_EDGES, CausalVAE, acyclicity,
                                          edges_matrix, linear_scm)

DESCENDANTS = {0: {2, 3}, 1: {2, 3}, 2: set(), 3: set()}   # of each concept under TRUE_EDGES


def test_acyclicity_is_zero_exactly_on_dags():
    assert acyclicity(edges_matrix(4, TRUE_EDGES)).item() == pytest.approx(0.0, abs=1e-6)
    assert acyclicity(edges_matrix(4, [(0, 2), (2, 0)])).item() > 0.5


def test_linear_scm_solves_the_structural_equation():
    graph = edges_matrix(4, TRUE_EDGES) * 0.7
    noise = torch.randn(3, 4, 2)
    z = linear_scm(graph, noise)
    assert torch.allclose(z, torch.einsum("ji,bjk->bik", graph, z) + noise, atol=1e-5)


@pytest.mark.parametrize("ccgm", [False, True])
def test_interventions_propagate_to_children_only(ccgm):
    torch.manual_seed(0)
    model = CausalVAE(img_size=16, fixed_dag=True, ccgm=ccgm).eval()
    noise = torch.randn(5, 4, 4)
    base_z, base = model.causal_latents(noise)
    for i in range(4):                                      # do(z_i = its own value) changes nothing
        _, same = model.causal_latents(noise, {i: (base if ccgm else base_z)[:, i]})
        assert torch.allclose(same, base, atol=1e-5)
    _, shadow = model.causal_latents(noise, {3: torch.full((5, 4), 0.9)})
    assert torch.equal(shadow[:, :2], base[:, :2])          # do(shadow position): θ and sun untouched
    assert torch.equal(shadow[:, 2], base[:, 2])            # and the sibling shadow length
    _, theta = model.causal_latents(noise, {0: torch.full((5, 4), -0.9)})
    assert torch.equal(theta[:, 1], base[:, 1])             # do(θ): the sun untouched
    assert (theta[:, 2:] - base[:, 2:]).abs().max() > 1e-3   # ... the shadow moves
    if ccgm:                                                # the counterfactual model without θ → shadow
        cut = model.without_edges([(0, 2), (0, 3)]).eval()
        _, cut_base = cut.causal_latents(noise)
        _, cut_theta = cut.causal_latents(noise, {0: torch.full((5, 4), -0.9)})
        assert torch.allclose(cut_theta[:, 2:], cut_base[:, 2:])


@pytest.mark.parametrize("ccgm", [False, True])
def test_intervene_moves_the_concept_block_by_the_set_value_and_only_descendants_follow(ccgm):
    """``intervene`` read at the decoder's input (the image is its sigmoid): between do(c = a quarter of c's range)
    and do(c = three quarters), concept c's block moves by exactly +1 in the [−1, 1] scale, its descendants move,
    and every other block equals the plain reconstruction's. Catches an intervention that is a reconstruction
    (moves 0), a flipped sign (−1), a value left unscaled, the wrong concept, and one that does not propagate."""
    torch.manual_seed(0)
    model = CausalVAE(img_size=16, fixed_dag=True, ccgm=ccgm).eval()
    x = torch.rand(3, 3, 16, 16)
    seen = []
    model.decoder.register_forward_hook(lambda module, inputs, logits: seen.append((inputs[0], logits)))

    def decoder_input(call):
        seen.clear()
        with torch.no_grad():
            image = call()
        ((latent, logits),) = seen
        assert torch.equal(image, torch.sigmoid(logits))
        return latent

    plain = decoder_input(lambda: model.reconstruct(x))
    for i, name in enumerate(CONCEPTS):
        low, high = FACTOR_LOW[i], FACTOR_HIGH[i]
        first = decoder_input(lambda: model.intervene(x, name, low + 0.25 * (high - low)))
        second = decoder_input(lambda: model.intervene(x, name, low + 0.75 * (high - low)))
        assert torch.allclose(second[:, i] - first[:, i], torch.ones_like(first[:, i]), atol=1e-5), name
        for j in set(range(len(CONCEPTS))) - {i}:
            if j in DESCENDANTS[i]:
                assert (second[:, j] - first[:, j]).abs().max() > 1e-3, (name, CONCEPTS[j])
            else:
                assert torch.allclose(first[:, j], plain[:, j], atol=1e-6), (name, CONCEPTS[j])
                assert torch.allclose(second[:, j], plain[:, j], atol=1e-6), (name, CONCEPTS[j])


def test_intervene_returns_images_and_training_lowers_the_loss():
    """Catches an encoder–decoder that ignores its input (a constant or mean image never beats the data mean) and a
    reconstruction paired with the wrong image."""
    torch.manual_seed(0)
    from lit_robust.datamodules.pendulum import factors_from, render
    factors = factors_from(torch.linspace(-30, 30, 32), torch.linspace(60, 120, 32))
    images = render(factors, 16, supersample=1)
    model = CausalVAE(img_size=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = model.losses(images, factors)["loss"].item()
    for _ in range(60):
        loss = model.losses(images, factors)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.losses(images, factors)["loss"].item() < 0.9 * start
    # reconstructions are of *this* image: closer to it than to another image, and than the best constant (the mean)
    squared_error = lambda output, target: (output - target).pow(2).flatten(1).sum(1).mean().item()
    with torch.no_grad():
        reconstructions = model.eval().reconstruct(images)
    own = squared_error(reconstructions, images)
    assert own < squared_error(reconstructions, images.roll(16, 0))
    assert own < squared_error(images.mean(0, keepdim=True), images)
    out = model.intervene(images[:2], "theta", 20.0)
    assert out.shape == (2, 3, 16, 16) and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="unknown factor"):
        model.intervene(images[:2], "moon", 1.0)


def test_counterfactual_report_writes_measurements_and_grid(tmp_path):
    import lightning as L

    from lit_robust.callbacks import CounterfactualReport, MetricsFile
    from lit_robust.datamodules import PendulumDataModule

    torch.manual_seed(0)
    data = PendulumDataModule(img_size=16, sampling="uniform", n_samples=64, batch_size=32, seed=0)
    report = CounterfactualReport(str(tmp_path), num_values=3, eval_size=8, regressor_epochs=1)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[report, MetricsFile(str(tmp_path))])
    model = CausalVAE(img_size=16, fixed_dag=True)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"cf/do_theta/shadow_position_change", "cf/do_shadow_position/theta_change",
            "cf/do_theta/theta_tracking", "cf/regressor_mae/sun"} <= set(metrics)
    factors = ("theta", "sun", "shadow_length", "shadow_position")
    for i, name in enumerate(factors):            # the data's SCM: do(f) moves exactly f's children (TRUE_EDGES)
        for j, other in enumerate(factors):
            if j != i:
                moved = metrics[f"cf/do_{name}/{other}_true_change"] > 0.05
                assert moved == ((i, j) in TRUE_EDGES), (name, other)
    assert (tmp_path / "counterfactual_grid.png").stat().st_size > 1000


def carrying(factors: torch.Tensor) -> torch.Tensor:
    """Stand-in 16×16 RGB images whose first four pixels hold their factors, for ``FactorReader``."""
    images = torch.zeros(len(factors), 3, 16, 16)
    images[:, 0, 0, :4] = factors
    return images


class FactorReader(torch.nn.Module):
    """A factor regressor without error on ``carrying`` images."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :4]


class SCMCounterfactuals(torch.nn.Module):
    """Counterfactuals that are exactly right (the Pendulum SCM applied to each test image's factors), or, with
    ``ignore_interventions``, a model whose do() returns the reconstruction."""

    def __init__(self, images: torch.Tensor, factors: torch.Tensor, ignore_interventions: bool = False):
        super().__init__()
        self.images, self.factors, self.ignore_interventions = images, factors, ignore_interventions
        self.device = torch.device("cpu")

    def factors_of(self, x: torch.Tensor) -> torch.Tensor:
        return self.factors[torch.cdist(x.flatten(1), self.images.flatten(1)).argmin(1)]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return carrying(self.factors_of(x))

    def intervene(self, x: torch.Tensor, factor: str, value: float) -> torch.Tensor:
        if self.ignore_interventions:
            return self.reconstruct(x)
        return carrying(pendulum.intervene(self.factors_of(x), **{factor: value}))


def test_counterfactual_report_measures_the_models_interventions(tmp_path, monkeypatch):
    """The report's numbers, with its regressor replaced by an exact reader: for exactly right counterfactuals every
    ``<f>_tracking`` is 0 and every ``<g>_change`` equals the true SCM's change (so do(f) moves f's children and
    nothing else); for a model whose do() is its reconstruction, every change is 0 and every tracking the mean
    distance of the set values from the images' own. Catches a report that reads the reconstructions instead of the
    counterfactuals, a tracking with the wrong sign, and constant or made-up numbers."""
    from lit_robust.callbacks import CounterfactualReport, counterfactual_report
    from lit_robust.datamodules import PendulumDataModule

    monkeypatch.setattr(counterfactual_report, "fit_factor_regressor", lambda *args, **kwargs: FactorReader())
    data = PendulumDataModule(img_size=16, sampling="uniform", n_samples=64, seed=0)
    data.setup()
    images, factors = data.test_dataset.images[:8], data.test_dataset.targets[:8]
    span = data.train_dataset.targets.max(0).values - data.train_dataset.targets.min(0).values
    train = (data.train_dataset.images, data.train_dataset.targets)
    for ignore in (False, True):
        metrics = CounterfactualReport(num_values=3, eval_size=8).measure(
            SCMCounterfactuals(images, factors, ignore_interventions=ignore), train, (images, factors), data.intervene,
            tmp_path / str(ignore))
        for i, name in enumerate(CONCEPTS):
            values = torch.linspace(data.train_dataset.targets[:, i].min() + 0.1 * span[i],
                                    data.train_dataset.targets[:, i].max() - 0.1 * span[i], 3)
            missed = ((factors[:, i, None] - values).abs().mean() / span[i]).item()
            assert metrics[f"cf/do_{name}/{name}_tracking"] == pytest.approx(missed if ignore else 0.0, abs=1e-6)
            for j, other in enumerate(CONCEPTS):
                if j != i:
                    true_change = metrics[f"cf/do_{name}/{other}_true_change"]
                    assert (true_change > 0.05) == (j in DESCENDANTS[i])
                    assert metrics[f"cf/do_{name}/{other}_change"] == pytest.approx(0.0 if ignore else true_change,
                                                                                    rel=1e-5, abs=1e-7)


def test_per_concept_decoders_add_one_picture_per_block():
    """logits(z) = mean_i dec_i(z_i): the effect of changing block 0 does not depend on the other blocks."""
    from lit_robust.models.causal_vae import ConvDecoder

    torch.manual_seed(0)
    decoder = ConvDecoder(16, 3, 16, width=8, groups=4)
    a, a2, rest, rest2 = torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    effect = decoder(torch.cat([a, rest], 1)) - decoder(torch.cat([a2, rest], 1))
    effect_elsewhere = decoder(torch.cat([a, rest2], 1)) - decoder(torch.cat([a2, rest2], 1))
    assert effect.abs().max() > 1e-4 and torch.allclose(effect, effect_elsewhere, atol=1e-5)
    joint = ConvDecoder(16, 3, 16, width=8)
    assert not torch.allclose(joint(torch.cat([a, rest], 1)) - joint(torch.cat([a2, rest], 1)),
                              joint(torch.cat([a, rest2], 1)) - joint(torch.cat([a2, rest2], 1)), atol=1e-5)


def test_factor_regressor_reads_factors_in_their_units_and_is_cached_by_its_settings(tmp_path, monkeypatch):
    """The report's factor regressor, trained on images whose planes carry their factors (shifted and scaled far from 0
    and 1),
    reads held-out factors back in their own units better than their mean does; with ``cache_dir`` a second
    report with the same data and settings loads it (same outputs, no training) and other settings train anew.
    Catches a regressor fitted or read back in standardised units, a sign flip, and a cache that is never read or
    keyed without the settings."""
    from lit_robust.callbacks import CounterfactualReport, counterfactual_report

    generator = torch.Generator().manual_seed(0)
    factors = torch.rand(192, 4, generator=generator) * torch.tensor([40.0, 2.0, 9.0, 0.5]) + torch.tensor(
        [-20.0, 5.0, 30.0, -3.0])
    images = ((factors - factors.mean(0)) / factors.std(0))[:, :, None, None].expand(-1, -1, 8, 8).clone()
    train, held_out = slice(0, 160), slice(160, None)
    fits = []
    fit = counterfactual_report.fit_factor_regressor
    monkeypatch.setattr(counterfactual_report, "fit_factor_regressor", lambda *a, **k: fits.append(1) or fit(*a, **k))
    report = CounterfactualReport(regressor_epochs=30, regressor_widths=[8], cache_dir=str(tmp_path))
    regressor = report._regressor(images[train], factors[train])
    with torch.no_grad():
        read = regressor(images[held_out])
    error = (read - factors[held_out]).abs().mean(0)
    baseline = (factors[train].mean(0) - factors[held_out]).abs().mean(0)
    assert (error < 0.8 * baseline).all(), (error, baseline)
    again = CounterfactualReport(regressor_epochs=30, regressor_widths=[8], cache_dir=str(tmp_path))._regressor(
        images[train], factors[train])
    with torch.no_grad():
        assert torch.equal(again(images[held_out]), read) and len(fits) == 1
    for other in ({"regressor_epochs": 29}, {"regressor_widths": [6]}, {"seed": 1}):
        CounterfactualReport(**{"regressor_epochs": 30, "regressor_widths": [8], **other},
                             cache_dir=str(tmp_path))._regressor(images[train], factors[train])
    assert len(fits) == 4 and len(list(tmp_path.glob("factor_regressor-*.pt"))) == 4
