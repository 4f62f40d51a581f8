"""LAVAE: stage switching, which parameters each stage trains, and the latent maps' algebra."""
import pytest
import torch

from lit_robust.models.lavae import LAVAE, augment


def tiny(**kwargs) -> LAVAE:
    torch.manual_seed(0)
    return LAVAE(img_size=8, latent_dim=4, hidden=32, **kwargs)


def test_augmentations_are_exact_and_checked():
    x = torch.arange(4.0).view(1, 1, 2, 2)
    assert torch.equal(augment(x, "hflip"), torch.tensor([[[[1.0, 0.0], [3.0, 2.0]]]]))
    assert torch.equal(augment(augment(x, "rot90"), "rot90"), augment(x, "rot180"))
    with pytest.raises(ValueError, match="unknown augmentation"):
        LAVAE(augmentations=("rot90", "shear"))


def test_identity_maps_make_latent_augmentation_the_reconstruction():
    model = tiny()
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(model.latent_augment(x, 0), model.reconstruct(x))
    assert torch.allclose(model.latent_compose(x), model.latent_compose(x, reverse=True))


@pytest.mark.parametrize("stage, trained", [(1, {"encoder", "decoder"}), (2, {"latent_maps"}),
                                            (3, {"transfer_decoder"})])
def test_each_stage_trains_only_its_parameters(stage, trained):
    model = tiny()
    with torch.no_grad():
        model.latent_maps.add_(0.1 * torch.randn_like(model.latent_maps))
    loss = {1: model.reconstruction_loss, 2: model.latent_map_loss, 3: model.transfer_loss}[stage](torch.rand(4, 1, 8, 8))
    loss.backward()
    with_grad = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trained


def test_stage_two_reaches_the_least_squares_maps():
    """Eq. 5.4 with φ fixed is linear least squares per map: training L must reach the closed-form optimum."""
    model = tiny(augmentations=("hflip", "vflip"))
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        z0 = model.phi(x)
        optimum = sum(((z0 @ torch.linalg.lstsq(z0, model.phi(augment(x, a))).solution - model.phi(augment(x, a))) ** 2)
                      .sum(-1).mean() for a in ("hflip", "vflip")).item()
    optimizer = torch.optim.Adam([model.latent_maps], lr=5e-2)
    start = model.latent_map_loss(x).item()
    for _ in range(300):
        loss = model.latent_map_loss(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = model.latent_map_loss(x).item()
    assert final < start and final <= optimum * 1.05 + 1e-6
    errors = model.augmentation_errors(x)
    assert {"mse_latent/hflip", "mse_original/composition", "mse_transfer/rot180"} <= set(errors)
